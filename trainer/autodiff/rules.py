"""Gradient rules: for one forward node, the gradients of its inputs from those of its outputs.

A rule is ``rule(e, node, gouts, need) -> gins``: ``gouts[k]`` names the gradient of
output k (None: nothing flows back from it), ``need[j]`` says whether input j wants a
gradient, and the rule returns one name or None per input. Rules only ever compute
gradients of activations: frozen weights are constants, so nothing asks for theirs.
Every rule is checked against float64 finite differences in
tests/unit/test_autodiff_rules.py.

:data:`ZERO_GRADIENT` lists ops whose outputs carry no gradient (shape arithmetic,
comparisons, rounding): their outputs never require one, whatever their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from .emitter import Emitter

__all__ = ["Rule", "RULES", "ZERO_GRADIENT", "UnsupportedNodeError", "rule_for"]

Grads = list[str | None]
Rule = Callable[[Emitter, onnx.NodeProto, Sequence[str | None], Sequence[bool]], Grads]

ZERO_GRADIENT = frozenset({
    "Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero", "OneHot",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf", "ArgMax", "ArgMin", "Floor", "Ceil", "Round", "Sign",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli",
})


class UnsupportedNodeError(ValueError):
    """A node on the gradient path has no rule (or a form the rule does not cover)."""

    def __init__(self, node: onnx.NodeProto, detail: str = "") -> None:
        what = f"op {node.op_type!r}" + (f" (domain {node.domain})" if node.domain else "")
        super().__init__(
            f"lorad's portable training backend has no gradient rule for {what} at node "
            f"{node.name or '(unnamed)'!r}{': ' + detail if detail else ''}; the LoRA gradient must flow "
            f"through it. Use trainer.backend: ort-training where available, or target layers before it"
        )
        self.op_type = node.op_type
        self.node_name = node.name


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = _attr(node, name, default)
    assert isinstance(value, int)
    return value


def _out_dims(e: Emitter, node: onnx.NodeProto, k: int = 0) -> tuple[int | str | None, ...] | None:
    return e.dims(node.output[k])


def _constant_ints(e: Emitter, name: str, node: onnx.NodeProto) -> list[int]:
    value = e.constant_value(name)
    if value is None:
        raise UnsupportedNodeError(node, f"input {name!r} must be a constant (it sets axes)")
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _rank(e: Emitter, name: str, node: onnx.NodeProto) -> int:
    rank = e.rank(name)
    if rank is None:
        raise UnsupportedNodeError(node, f"the rank of {name!r} is unknown after shape inference")
    return rank


# -- elementwise arithmetic ----------------------------------------------------------------

def _add(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    dims = _out_dims(e, node)
    out: Grads = []
    for j, x in enumerate(node.input):
        if not need[j]:
            out.append(None)
            continue
        gj = g if node.op_type != "Sub" or j == 0 else e.op("Neg", [g])
        out.append(e.sum_to(gj, dims, x))
    return out


def _mul(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    a, b = node.input
    dims = _out_dims(e, node)
    ga = e.sum_to(e.op("Mul", [g, b]), dims, a) if need[0] else None
    gb = e.sum_to(e.op("Mul", [g, a]), dims, b) if need[1] else None
    return [ga, gb]


def _div(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    a, b = node.input
    dims = _out_dims(e, node)
    ga = e.sum_to(e.op("Div", [g, b]), dims, a) if need[0] else None
    # d(a/b)/db = -(a/b)/b
    gb = e.sum_to(e.op("Neg", [e.op("Div", [e.op("Mul", [g, node.output[0]]), b])]), dims, b) if need[1] else None
    return [ga, gb]


def _sum(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    dims = _out_dims(e, node)
    return [e.sum_to(g, dims, x) if need[j] else None for j, x in enumerate(node.input)]


def _pow(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    x, p = node.input
    y = node.output[0]
    dims = _out_dims(e, node)
    gx = gp = None
    if need[0]:
        p_cast = p if e.elem_type(p) == e.elem_type(x) else e.op("Cast", [p], to=e.elem_type(x))
        p_minus_1 = e.op("Sub", [p_cast, e.scalar_like(1.0, x)])
        gx = e.sum_to(e.op("Mul", [g, e.op("Mul", [p_cast, e.op("Pow", [x, p_minus_1])])]), dims, x)
    if need[1]:
        gp = e.sum_to(e.op("Mul", [g, e.op("Mul", [y, e.op("Log", [x])])]), dims, p)
    return [gx, gp]


# -- unary functions -----------------------------------------------------------------------

def _unary(derivative: Callable[[Emitter, str, str], str]) -> Rule:
    """A rule for y = f(x) with dy/dx = derivative(e, x, y)."""
    def rule(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
        g = gouts[0]
        assert g is not None
        return [e.op("Mul", [g, derivative(e, node.input[0], node.output[0])])] + [None] * (len(node.input) - 1)
    return rule


def _d_erf(e: Emitter, x: str, y: str) -> str:
    return e.op("Mul", [e.scalar_like(2.0 / math.sqrt(math.pi), x), e.op("Exp", [e.op("Neg", [e.op("Mul", [x, x])])])])


def _d_tanh(e: Emitter, x: str, y: str) -> str:
    return e.op("Sub", [e.scalar_like(1.0, x), e.op("Mul", [y, y])])


def _d_sigmoid(e: Emitter, x: str, y: str) -> str:
    return e.op("Mul", [y, e.op("Sub", [e.scalar_like(1.0, x), y])])


def _d_relu(e: Emitter, x: str, y: str) -> str:
    return e.op("Cast", [e.op("Greater", [x, e.scalar_like(0.0, x)])], to=e.elem_type(x))


def _d_gelu_exact(e: Emitter, x: str, y: str) -> str:
    # d/dx x·Φ(x) = Φ(x) + x·φ(x)
    cdf = e.op("Mul", [e.scalar_like(0.5, x), e.op("Add", [
        e.scalar_like(1.0, x), e.op("Erf", [e.op("Mul", [x, e.scalar_like(1.0 / math.sqrt(2.0), x)])])])])
    pdf = e.op("Mul", [e.scalar_like(1.0 / math.sqrt(2.0 * math.pi), x),
                       e.op("Exp", [e.op("Mul", [e.op("Mul", [x, x]), e.scalar_like(-0.5, x)])])])
    return e.op("Add", [cdf, e.op("Mul", [x, pdf])])


def _d_gelu_tanh(e: Emitter, x: str, y: str) -> str:
    # y = ½x(1 + tanh(k(x + c·x³))); y' = ½(1 + t) + ½x(1 - t²)·k(1 + 3c·x²)
    k, c = math.sqrt(2.0 / math.pi), 0.044715
    x2 = e.op("Mul", [x, x])
    inner = e.op("Mul", [e.scalar_like(k, x), e.op("Add", [x, e.op("Mul", [e.scalar_like(c, x), e.op("Mul", [x2, x])])])])
    t = e.op("Tanh", [inner])
    half = e.scalar_like(0.5, x)
    one = e.scalar_like(1.0, x)
    left = e.op("Mul", [half, e.op("Add", [one, t])])
    slope = e.op("Mul", [e.scalar_like(k, x), e.op("Add", [one, e.op("Mul", [e.scalar_like(3 * c, x), x2])])])
    right = e.op("Mul", [e.op("Mul", [half, x]), e.op("Mul", [e.op("Sub", [one, e.op("Mul", [t, t])]), slope])])
    return e.op("Add", [left, right])


def _gelu(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    if node.domain == "com.microsoft" and len(node.input) > 1:
        raise UnsupportedNodeError(node, "the biased form of com.microsoft Gelu")
    approximate = _attr(node, "approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    derivative = _d_gelu_tanh if approximate == "tanh" else _d_gelu_exact
    return _unary(derivative)(e, node, gouts, need)


def _identity(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    return [gouts[0]] + [None] * (len(node.input) - 1)


def _neg(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    assert gouts[0] is not None
    return [e.op("Neg", [gouts[0]])]


def _cast(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    """Cast and CastLike: the gradient goes back in the input's type (CastLike's second
    input only lends its type)."""
    assert gouts[0] is not None
    back = e.op("Cast", [gouts[0]], to=e.elem_type(node.input[0])) if need[0] else None
    return [back] + [None] * (len(node.input) - 1)


# -- normalisation and attention -----------------------------------------------------------

def _softmax_axis(e: Emitter, node: onnx.NodeProto) -> int:
    rank = _rank(e, node.input[0], node)
    axis = _int_attr(node, "axis", -1 if e.opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if e.opset < 13 and axis != rank - 1:
        raise UnsupportedNodeError(node, "before opset 13 only a softmax over the last axis")
    return axis


def _softmax(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    y = node.output[0]
    axis = _softmax_axis(e, node)
    inner = e.reduce("ReduceSum", e.op("Mul", [g, y]), [axis], keepdims=True)
    return [e.op("Mul", [y, e.op("Sub", [g, inner])])]


def _log_softmax(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    axis = _softmax_axis(e, node)
    total = e.reduce("ReduceSum", g, [axis], keepdims=True)
    return [e.op("Sub", [g, e.op("Mul", [e.op("Exp", [node.output[0]]), total])])]


def _layer_norm(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    if g is None:
        raise UnsupportedNodeError(node, "gradients through its mean or inverse std-dev outputs")
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = _rank(e, x, node)
    axis = _int_attr(node, "axis", -1)
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(_attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    # Recomputed from x: exporters declare only the normalised output.
    mean = e.reduce("ReduceMean", x, axes, keepdims=True)
    centred = e.op("Sub", [x, mean])
    var = e.reduce("ReduceMean", e.op("Mul", [centred, centred]), axes, keepdims=True)
    inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.scalar_like(eps, x)])])])
    xhat = e.op("Mul", [centred, inv_std])
    dims = _out_dims(e, node)
    gx = gs = gb = None
    if need[0]:
        gy = e.op("Mul", [g, scale])
        mean_gy = e.reduce("ReduceMean", gy, axes, keepdims=True)
        mean_gy_xhat = e.reduce("ReduceMean", e.op("Mul", [gy, xhat]), axes, keepdims=True)
        gx = e.op("Mul", [inv_std, e.op("Sub", [e.op("Sub", [gy, mean_gy]), e.op("Mul", [xhat, mean_gy_xhat])])])
    if need[1]:
        gs = e.sum_to(e.op("Mul", [g, xhat]), dims, scale)
    if bias is not None and need[2]:
        gb = e.sum_to(g, dims, bias)
    return [gx, gs, gb][: len(node.input)]


# -- linear algebra ------------------------------------------------------------------------

def _matmul(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    a, b = node.input
    ra, rb = _rank(e, a, node), _rank(e, b, node)
    if ra < 2 or rb < 2:
        raise UnsupportedNodeError(node, "MatMul with a 1-D operand")
    out_dims = _out_dims(e, node)
    batch = None if out_dims is None else out_dims[:-2]
    ga = gb = None
    if need[0]:
        a_dims = e.dims(a)
        ga = e.op("MatMul", [g, e.transpose_last2(b, rb)])
        ga = e.sum_to(ga, None if batch is None or a_dims is None else (*batch, *a_dims[-2:]), a)
    if need[1]:
        b_dims = e.dims(b)
        gb = e.op("MatMul", [e.transpose_last2(a, ra), g])
        gb = e.sum_to(gb, None if batch is None or b_dims is None else (*batch, *b_dims[-2:]), b)
    return [ga, gb]


def _gemm(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    a, b = node.input[0], node.input[1]
    alpha = float(_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
    beta = float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
    trans_a, trans_b = _int_attr(node, "transA", 0), _int_attr(node, "transB", 0)

    def scaled(t: str, factor: float) -> str:
        return t if factor == 1.0 else e.op("Mul", [t, e.scalar_like(factor, g)])

    out: Grads = [None] * len(node.input)
    if need[0]:
        # Y = α·A'·B' + β·C: dA' = α·g·B'ᵀ; A = A'ᵀ when transA.
        b_prime_t = b if trans_b else e.op("Transpose", [b], perm=[1, 0])
        ga = e.op("MatMul", [g, b_prime_t])
        out[0] = scaled(e.op("Transpose", [ga], perm=[1, 0]) if trans_a else ga, alpha)
    if need[1]:
        a_prime_t = a if trans_a else e.op("Transpose", [a], perm=[1, 0])
        gb = e.op("MatMul", [a_prime_t, g])
        out[1] = scaled(e.op("Transpose", [gb], perm=[1, 0]) if trans_b else gb, alpha)
    if len(node.input) > 2 and node.input[2] and need[2]:
        out[2] = e.sum_to(scaled(g, beta), _out_dims(e, node), node.input[2])
    return out


#: Most elements of a dequantised weight the backward of one MatMulNBits holds at once: a
#: larger W (SmolLM2's tied head, 49,152 × 576) is dequantised and multiplied in slices of
#: its N rows, so the head's backward needs 16 MB of fp32 at a time instead of 113 MB per
#: intermediate.
NBITS_SLICE_ELEMENTS = 4 << 20


def _matmul_nbits(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    """``y = x·Wᵀ`` of ``com.microsoft.MatMulNBits`` (W ``[N, K]`` packed per block along K):
    ``dx = g·W``. The weight is frozen, so only ``x`` gets a gradient.

    W is dequantised inside the backward graph from the packed codes, node by node, as the
    op defines it: ``(code - zero_point)·scale`` per block (4-bit codes two to a byte, the
    even element in the low nibble; zero point 8, 128 for 8 bits, a float per block, or
    uint8 codes per block packed as the weights are: ONNX Runtime's quantiser writes those),
    the codes unpacked in uint8. A K that is not a whole number of blocks is padded to one
    in the packed weight; the padding is dropped after dequantising. A W of more than :data:`NBITS_SLICE_ELEMENTS` elements is
    done in slices of its rows, ``dx = Σ_c g[..., c]·W[c, :]``. Nothing here is an fp32
    copy kept beside the model, provided the session that runs this graph is made with
    ``disabled_optimizers=["ConstantFolding"]``: else ONNX Runtime folds every dequantised
    weight into an fp32 initializer, a full fp32 copy of the base (SmolLM2-135M: 424 MB).
    """
    g = gouts[0]
    assert g is not None
    out: Grads = [None] * len(node.input)
    if not need[0]:
        return out
    k, n = _int_attr(node, "K", 0), _int_attr(node, "N", 0)
    bits, block = _int_attr(node, "bits", 4), _int_attr(node, "block_size", 0)
    if bits not in (4, 8) or k <= 0 or n <= 0 or block <= 0:
        raise UnsupportedNodeError(node, f"MatMulNBits with bits={bits}, K={k}, N={n}, block_size={block}")
    zero_point = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    blocks = -(-k // block)
    rows = max(1, min(n, NBITS_SLICE_ELEMENTS // k))
    products = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        weight = _dequantized_rows(e, node, zero_point, g, start, stop, n=n, k=k, bits=bits, blocks=blocks, block=block)
        part = g if (start, stop) == (0, n) else e.op("Slice", [g, e.ints([start]), e.ints([stop]), e.ints([-1])])
        products.append(e.op("MatMul", [part, weight]))
    out[0] = products[0] if len(products) == 1 else e.op("Sum", products)
    return out


def _dequantized_rows(e: Emitter, node: onnx.NodeProto, zero_point: str, like: str, start: int, stop: int, *,
                      n: int, k: int, bits: int, blocks: int, block: int) -> str:
    """Rows ``start:stop`` of MatMulNBits' W, ``[rows, K]`` in ``like``'s float type."""
    count = stop - start

    def rows_of(name: str, shape: Sequence[int] | None = None) -> str:
        """Rows start:stop of ``name``, first given ``shape`` (scales may be flat: [N·blocks])."""
        if shape is not None:
            name = e.op("Reshape", [name, e.ints(shape)])
        return name if (start, stop) == (0, n) else e.op("Slice", [name, e.ints([start]), e.ints([stop]), e.ints([0])])

    def unpacked(packed: str) -> str:
        """uint8 codes, two 4-bit ones per byte (low nibble first) split into a new last axis."""
        if bits == 8:
            return packed
        low = e.unsqueeze(e.op("Mod", [packed, e.const(np.asarray(16, np.uint8))]), [-1])
        high = e.unsqueeze(e.op("BitShift", [packed, e.const(np.asarray(4, np.uint8))], direction="RIGHT"), [-1])
        return e.op("Concat", [low, high], axis=-1)

    codes = unpacked(rows_of(node.input[1]))  # from uint8 [rows, blocks, block·bits/8]
    values = e.op("Reshape", [e.op("CastLike", [codes, like]), e.ints([count, blocks, block])])
    if zero_point and e.elem_type(zero_point) == onnx.TensorProto.UINT8:
        # [N, ⌈blocks·bits/8⌉] bytes: unpack, then drop a 4-bit pad for an odd block count.
        zero_codes = e.op("Reshape", [unpacked(rows_of(zero_point, [n, -1])), e.ints([count, -1])])
        if bits == 4 and blocks % 2:
            zero_codes = e.op("Slice", [zero_codes, e.ints([0]), e.ints([blocks]), e.ints([1])])
        zero = e.op("Reshape", [e.op("CastLike", [zero_codes, like]), e.ints([count, blocks, 1])])
    elif zero_point:
        zero = e.op("Reshape", [e.op("CastLike", [rows_of(zero_point, [n, blocks]), like]), e.ints([count, blocks, 1])])
    else:
        zero = e.scalar_like(8.0 if bits == 4 else 128.0, like)
    scales = e.op("Reshape", [e.op("CastLike", [rows_of(node.input[2], [n, blocks]), like]), e.ints([count, blocks, 1])])
    weight = e.op("Reshape", [e.op("Mul", [e.op("Sub", [values, zero]), scales]), e.ints([count, blocks * block])])
    return weight if blocks * block == k else e.op("Slice", [weight, e.ints([0]), e.ints([k]), e.ints([1])])


# -- shape and layout ----------------------------------------------------------------------

def _reshape_back(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    """Reshape, Flatten, Squeeze, Unsqueeze: the same elements, so reshape the gradient back."""
    assert gouts[0] is not None
    return [e.reshape_like(gouts[0], node.input[0])] + [None] * (len(node.input) - 1)


def _transpose(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    assert gouts[0] is not None
    perm = _attr(node, "perm", None)
    if perm is None:
        perm = list(reversed(range(_rank(e, node.input[0], node))))
    assert isinstance(perm, list)
    inverse = [0] * len(perm)
    for k, p in enumerate(perm):
        inverse[p] = k
    return [e.op("Transpose", [gouts[0]], perm=inverse)]


def _expand(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    assert gouts[0] is not None
    return [e.sum_to(gouts[0], _out_dims(e, node), node.input[0]), None]


def _concat(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    rank = _rank(e, node.output[0], node)
    axis = _int_attr(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    # Each input's slice of the gradient, at offsets read from the inputs' shapes.
    offset = e.ints([0])
    out: Grads = []
    for j, x in enumerate(node.input):
        size = e.op("Gather", [e.shape(x), e.ints([axis])], axis=0)
        end = e.op("Add", [offset, size])
        out.append(e.op("Slice", [g, offset, end, e.ints([axis])]) if need[j] else None)
        offset = end
    return out


def _split(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    rank = _rank(e, node.input[0], node)
    axis = _int_attr(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    pieces = [g if g is not None else e.zeros_like(out) for g, out in zip(gouts, node.output, strict=True)]
    return [e.op("Concat", pieces, axis=axis)] + [None] * (len(node.input) - 1)


def _index_map(e: Emitter, node: onnx.NodeProto, x: str) -> str:
    """Run ``node`` on the flat indices of ``x`` instead of ``x``: which element went where."""
    size = e.op("Size", [x])
    flat = e.op("Range", [e.const(np.asarray(0, np.int64)), size, e.const(np.asarray(1, np.int64))])
    indices = e.op("Reshape", [flat, e.shape(x)])
    out = e.fresh(f"{node.op_type}_indices")
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = out
    copy.input[0] = indices
    del copy.output[:]
    copy.output.append(out)
    e.nodes.append(copy)
    return out


def _scatter_back(e: Emitter, node: onnx.NodeProto, g: str, x: str, *, may_repeat: bool) -> str:
    """The gradient of a selection (Slice, Gather): scatter g back to where it came from."""
    moved = _index_map(e, node, x)
    zeros = e.op("Reshape", [e.zeros_like(x), e.ints([-1])])
    operands = [zeros, e.op("Reshape", [moved, e.ints([-1])]), e.op("Reshape", [g, e.ints([-1])])]
    if may_repeat:
        if e.opset < 16:
            raise UnsupportedNodeError(node, "a gather with repeated indices needs opset >= 16 (ScatterElements add)")
        scattered = e.op("ScatterElements", operands, axis=0, reduction="add")
    else:
        scattered = e.op("ScatterElements", operands, axis=0)
    return e.reshape_like(scattered, x)


def _slice(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    assert gouts[0] is not None
    return [_scatter_back(e, node, gouts[0], node.input[0], may_repeat=False)] + [None] * (len(node.input) - 1)


def _gather(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    assert gouts[0] is not None
    if not need[0]:
        return [None, None]
    indices = e.constant_value(node.input[1])
    repeats = indices is None or len(np.unique(indices)) != np.asarray(indices).size
    return [_scatter_back(e, node, gouts[0], node.input[0], may_repeat=repeats), None]


def _reduce_axes(e: Emitter, node: onnx.NodeProto) -> list[int] | None:
    axes_input_from = 13 if node.op_type == "ReduceSum" else 18
    if e.opset >= axes_input_from:
        if len(node.input) > 1 and node.input[1]:
            return _constant_ints(e, node.input[1], node)
        return None if not _int_attr(node, "noop_with_empty_axes", 0) else []
    axes = _attr(node, "axes", None)
    return None if not isinstance(axes, list) else [int(a) for a in axes]


def _reduce(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    x = node.input[0]
    rank = _rank(e, x, node)
    axes = _reduce_axes(e, node)
    if axes == []:  # noop_with_empty_axes: the identity
        return [g] + [None] * (len(node.input) - 1)
    axes = sorted(a + rank if a < 0 else a for a in (axes if axes is not None else range(rank)))
    y = node.output[0]
    if not _int_attr(node, "keepdims", 1):
        g = e.unsqueeze(g, axes)
        y = e.unsqueeze(y, axes)
    if node.op_type == "ReduceL2":  # y = √Σx²: dy/dx = x / y (an L2 normalisation's norm)
        g = e.op("Div", [g, y])
    spread = e.op("Expand", [g, e.shape(x)])
    if node.op_type == "ReduceL2":
        spread = e.op("Mul", [spread, x])
    if node.op_type == "ReduceMean":
        count = e.op("Div", [e.op("Cast", [e.op("Size", [x])], to=e.elem_type(x)),
                             e.op("Cast", [e.op("Size", [node.output[0]])], to=e.elem_type(x))])
        spread = e.op("Div", [spread, count])
    return [spread] + [None] * (len(node.input) - 1)


def _where(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    g = gouts[0]
    assert g is not None
    cond, a, b = node.input
    zero = e.scalar_like(0.0, g)
    dims = _out_dims(e, node)
    ga = e.sum_to(e.op("Where", [cond, g, zero]), dims, a) if need[1] else None
    gb = e.sum_to(e.op("Where", [cond, zero, g]), dims, b) if need[2] else None
    return [None, ga, gb]


def _clip(e: Emitter, node: onnx.NodeProto, gouts: Sequence[str | None], need: Sequence[bool]) -> Grads:
    """y = min(max(x, lo), hi): the gradient passes where x was not clipped (y == x);
    the bounds (constants in the graphs lorad trains, e.g. an L2 normalisation's ε) get none."""
    g = gouts[0]
    assert g is not None
    x = node.input[0]
    kept = e.op("Cast", [e.op("Equal", [x, node.output[0]])], to=e.elem_type(x))
    return [e.op("Mul", [g, kept])] + [None] * (len(node.input) - 1)


def _sqrt(e: Emitter, x: str, y: str) -> str:
    return e.op("Div", [e.scalar_like(0.5, x), y])


RULES: dict[tuple[str, str], Rule] = {
    ("", "Add"): _add, ("", "Sub"): _add, ("", "Mul"): _mul, ("", "Div"): _div, ("", "Sum"): _sum,
    ("", "Pow"): _pow, ("", "Neg"): _neg,
    ("", "Sqrt"): _unary(_sqrt),
    ("", "Exp"): _unary(lambda e, x, y: y),
    ("", "Log"): _unary(lambda e, x, y: e.op("Reciprocal", [x])),
    ("", "Reciprocal"): _unary(lambda e, x, y: e.op("Neg", [e.op("Mul", [y, y])])),
    ("", "Erf"): _unary(_d_erf), ("", "Tanh"): _unary(_d_tanh), ("", "Sigmoid"): _unary(_d_sigmoid),
    ("", "Relu"): _unary(_d_relu), ("", "Gelu"): _gelu, ("com.microsoft", "Gelu"): _gelu,
    ("", "Identity"): _identity, ("", "Dropout"): _identity, ("", "Cast"): _cast, ("", "CastLike"): _cast,
    ("", "Softmax"): _softmax, ("", "LogSoftmax"): _log_softmax,
    ("", "LayerNormalization"): _layer_norm,
    ("", "MatMul"): _matmul, ("", "Gemm"): _gemm, ("com.microsoft", "MatMulNBits"): _matmul_nbits,
    ("", "Reshape"): _reshape_back, ("", "Flatten"): _reshape_back, ("", "Squeeze"): _reshape_back,
    ("", "Unsqueeze"): _reshape_back, ("", "Transpose"): _transpose, ("", "Expand"): _expand,
    ("", "Concat"): _concat, ("", "Split"): _split, ("", "Slice"): _slice, ("", "Gather"): _gather,
    ("", "ReduceMean"): _reduce, ("", "ReduceSum"): _reduce, ("", "ReduceL2"): _reduce,
    ("", "Where"): _where, ("", "Clip"): _clip,
}


def rule_for(node: onnx.NodeProto) -> Rule:
    rule = RULES.get((node.domain if node.domain not in ("ai.onnx",) else "", node.op_type))
    if rule is None:
        raise UnsupportedNodeError(node)
    return rule
