"""Every gradient rule against float64 central finite differences on random inputs.

Each case is a small graph f(inputs) -> outputs; the scalar L = Σ_k <output_k, seed_k>
is differentiated twice: by lorad's backward pass (run in float64 by ONNX's reference
evaluator, and in float32 by ONNX Runtime) and by central differences of the forward
graph in float64.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from lorad.trainer.autodiff import Emitter, UnsupportedNodeError, backward, graph_constants, infer_tensor_infos


@dataclass
class Case:
    name: str
    nodes: list[onnx.NodeProto]
    inputs: dict[str, tuple[int, ...]]  # differentiable inputs and their shapes
    outputs: list[str]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    positive: tuple[str, ...] = ()  # inputs drawn from (0.5, 1.5)
    opset: int = 17
    #: ONNX's reference Erf is accurate to ~1e-7 only: its differences need a longer step
    #: (5e-3: the truncation error, ~h²·f'''/6, stays below rtol; over 200 seeds, 1e-3 failed 55 times, 5e-3 never).
    fd_step: float = 1e-6
    rtol: float = 1e-6


def n(op: str, inputs: list[str], outputs: list[str] | str = "y", **attrs: Any) -> onnx.NodeProto:
    outs = [outputs] if isinstance(outputs, str) else outputs
    return helper.make_node(op, inputs, outs, name=f"{op}_{outs[0]}", **attrs)


def i64(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


CASES = [
    Case("add_broadcast", [n("Add", ["a", "b"])], {"a": (2, 3, 4), "b": (4,)}, ["y"]),
    Case("add_both_broadcast", [n("Add", ["a", "b"])], {"a": (2, 1, 4), "b": (3, 1)}, ["y"]),
    Case("sub", [n("Sub", ["a", "b"])], {"a": (2, 3), "b": (2, 3)}, ["y"]),
    Case("mul_broadcast", [n("Mul", ["a", "b"])], {"a": (2, 3, 4), "b": (3, 1)}, ["y"]),
    Case("div", [n("Div", ["a", "b"])], {"a": (2, 3), "b": (1, 3)}, ["y"], positive=("b",)),
    Case("pow_const", [n("Pow", ["a", "p"])], {"a": (2, 3)}, ["y"], {"p": np.asarray(3.0)}, positive=("a",)),
    Case("pow_both", [n("Pow", ["a", "b"])], {"a": (2, 3), "b": (3,)}, ["y"], positive=("a",)),
    Case("sqrt", [n("Sqrt", ["a"])], {"a": (2, 3)}, ["y"], positive=("a",)),
    Case("matmul", [n("MatMul", ["a", "b"])], {"a": (2, 3, 4), "b": (4, 5)}, ["y"]),
    Case("matmul_batched", [n("MatMul", ["a", "b"])], {"a": (2, 3, 4), "b": (2, 4, 5)}, ["y"]),
    Case("matmul_broadcast", [n("MatMul", ["a", "b"])], {"a": (3, 4), "b": (2, 4, 5)}, ["y"]),
    Case("gemm", [n("Gemm", ["a", "b", "c"], alpha=0.7, beta=1.3)], {"a": (3, 4), "b": (4, 5), "c": (5,)}, ["y"]),
    Case("gemm_trans", [n("Gemm", ["a", "b", "c"], transA=1, transB=1)], {"a": (4, 3), "b": (5, 4), "c": (3, 1)},
         ["y"]),
    Case("layer_norm", [n("LayerNormalization", ["a", "s", "b"], axis=-1, epsilon=1e-5)],
         {"a": (2, 3, 5), "s": (5,), "b": (5,)}, ["y"]),
    Case("layer_norm_two_axes", [n("LayerNormalization", ["a", "s"], axis=1)], {"a": (2, 3, 4), "s": (3, 4)}, ["y"]),
    Case("softmax_last", [n("Softmax", ["a"], axis=-1)], {"a": (2, 3, 4)}, ["y"]),
    Case("softmax_mid", [n("Softmax", ["a"], axis=1)], {"a": (2, 3, 4)}, ["y"]),
    Case("log_softmax", [n("LogSoftmax", ["a"], axis=-1)], {"a": (2, 5)}, ["y"]),
    Case("erf", [n("Erf", ["a"])], {"a": (2, 3)}, ["y"], fd_step=5e-3, rtol=2e-5),
    Case("tanh", [n("Tanh", ["a"])], {"a": (2, 3)}, ["y"]),
    Case("relu", [n("Relu", ["a"])], {"a": (3, 4)}, ["y"]),
    Case("sigmoid", [n("Sigmoid", ["a"])], {"a": (3, 4)}, ["y"]),
    Case("exp_log_neg_recip", [n("Exp", ["a"], "e"), n("Log", ["b"], "l"), n("Add", ["e", "l"], "s"),
                               n("Reciprocal", ["b"], "r"), n("Neg", ["r"], "nr"), n("Add", ["s", "nr"])],
         {"a": (2, 3), "b": (2, 3)}, ["y"], positive=("b",)),
    Case("gelu_exact", [n("Gelu", ["a"])], {"a": (2, 5)}, ["y"], opset=20, fd_step=5e-3, rtol=2e-5),
    Case("gelu_tanh", [n("Gelu", ["a"], approximate="tanh")], {"a": (2, 5)}, ["y"], opset=20),
    # exact GELU as torch exports Hugging Face BERT's: differentiated whole (autodiff/composite.py)
    Case("gelu_decomposed_div", [n("Div", ["a", "r2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "b"),
                                 n("Mul", ["a", "b"], "m"), n("Mul", ["m", "half"])], {"a": (2, 5)}, ["y"],
         {"r2": np.asarray(math.sqrt(2.0)), "one": np.asarray(1.0), "half": np.asarray(0.5)}, fd_step=5e-3, rtol=2e-5),
    Case("gelu_decomposed_mul", [n("Mul", ["inv_r2", "a"], "d"), n("Erf", ["d"], "e"), n("Add", ["one", "e"], "b"),
                                 n("Mul", ["b", "a"])], {"a": (3, 4)}, ["y"],
         {"inv_r2": np.asarray(1.0 / math.sqrt(2.0)), "one": np.asarray(1.0)}, fd_step=5e-3, rtol=2e-5),
    # its inner erf also read elsewhere: not taken whole, the op rules carry both paths
    Case("gelu_decomposed_shared_inner", [n("Div", ["a", "r2"], "d"), n("Erf", ["d"], "e"),
                                          n("Add", ["e", "one"], "b"), n("Mul", ["a", "b"], "y"),
                                          n("Mul", ["e", "a"], "z")], {"a": (2, 5)}, ["y", "z"],
         {"r2": np.asarray(math.sqrt(2.0)), "one": np.asarray(1.0)}, fd_step=5e-3, rtol=2e-5),
    Case("reshape", [n("Reshape", ["a", "shape"])], {"a": (2, 3, 4)}, ["y"], {"shape": i64(0, -1)}),
    Case("transpose", [n("Transpose", ["a"], perm=[2, 0, 1])], {"a": (2, 3, 4)}, ["y"]),
    Case("transpose_default", [n("Transpose", ["a"])], {"a": (2, 3, 4)}, ["y"]),
    Case("unsqueeze_squeeze_flatten", [n("Unsqueeze", ["a", "ax"], "u"), n("Squeeze", ["u", "ax"], "s"),
                                       n("Flatten", ["s"], axis=1)], {"a": (2, 3, 4)}, ["y"], {"ax": i64(1)}),
    Case("concat", [n("Concat", ["a", "b", "c"], axis=1)], {"a": (2, 1, 3), "b": (2, 2, 3), "c": (2, 3, 3)}, ["y"]),
    Case("split_one_unused", [n("Split", ["a", "sizes"], ["y0", "y1", "y2"], axis=-1)], {"a": (2, 6)}, ["y0", "y2"],
         {"sizes": i64(1, 2, 3)}),
    Case("slice_steps", [n("Slice", ["a", "st", "en", "ax", "sp"])], {"a": (4, 6)}, ["y"],
         {"st": i64(-1, 1), "en": i64(-5, 6), "ax": i64(0, 1), "sp": i64(-2, 2)}),
    Case("gather_repeated", [n("Gather", ["a", "idx"], axis=1)], {"a": (2, 4, 3)}, ["y"], {"idx": i64(0, 2, 2, 3)}),
    Case("gather_scalar", [n("Gather", ["a", "idx"], axis=1)], {"a": (2, 4, 3)}, ["y"],
         {"idx": np.asarray(1, np.int64)}),
    Case("gather_table", [n("Gather", ["table", "idx"], "emb", axis=0), n("Mul", ["emb", "a"])], {"a": (2, 3)}, ["y"],
         {"table": np.arange(12.0).reshape(4, 3), "idx": i64(3, 1)}),
    Case("reduce_mean", [n("ReduceMean", ["a"], axes=[1], keepdims=0)], {"a": (2, 3, 4)}, ["y"]),
    Case("reduce_mean_18", [n("ReduceMean", ["a", "ax"], keepdims=1)], {"a": (2, 3, 4)}, ["y"], {"ax": i64(-1, 0)},
         opset=18),
    Case("reduce_sum_all", [n("ReduceSum", ["a"], keepdims=0)], {"a": (2, 3)}, ["y"]),
    Case("reduce_l2_keep", [n("ReduceL2", ["a", "ax"], keepdims=1)], {"a": (2, 3, 4)}, ["y"], {"ax": i64(-1)}, opset=18),
    Case("reduce_l2_drop", [n("ReduceL2", ["a"], axes=[1], keepdims=0)], {"a": (2, 3, 4)}, ["y"]),
    Case("reduce_sum_axes", [n("ReduceSum", ["a", "ax"], keepdims=1)], {"a": (2, 3, 4)}, ["y"], {"ax": i64(-1)}),
    Case("clip", [n("Clip", ["a", "lo", "hi"])], {"a": (3, 4)}, ["y"], {"lo": np.array(-0.5), "hi": np.array(0.7)}),
    Case("clip_lower_only", [n("Clip", ["a", "lo"])], {"a": (3, 4)}, ["y"], {"lo": np.array(0.1)}),
    Case("where", [n("Where", ["c", "a", "b"])], {"a": (2, 3), "b": (3,)}, ["y"],
         {"c": np.asarray([[True, False, True], [False, False, True]])}),
    Case("cast_identity_dropout", [n("Cast", ["a"], "c", to=TensorProto.DOUBLE), n("Identity", ["c"], "i"),
                                   n("Dropout", ["i"])], {"a": (2, 3)}, ["y"]),
    Case("expand", [n("Expand", ["a", "shape"])], {"a": (3, 1)}, ["y"], {"shape": i64(2, 3, 4)}),
    Case("sum_n_ary", [n("Sum", ["a", "b", "c"])], {"a": (2, 3), "b": (3,), "c": (2, 1)}, ["y"]),
    Case("shape_ops_on_the_side",  # shape arithmetic of a graded tensor: no gradient flows there
         [n("Shape", ["a"], "sh"), n("Gather", ["sh", "zero"], "n0", axis=0), n("Unsqueeze", ["n0", "ax"], "n1"),
          n("Concat", ["n1", "minus1"], "target", axis=0), n("Reshape", ["a", "target"], "r"),
          n("Range", ["r0", "r4", "r1"], "rng"), n("Less", ["rng", "r2"], "lt"), n("CastLike", ["lt", "a"], "mask"),
          n("ConstantOfShape", ["sh2"], "ones_i", value=numpy_helper.from_array(np.ones(1, np.int64))),
          n("CastLike", ["ones_i", "a"], "ones"), n("Mul", ["r", "mask"], "m"), n("Mul", ["m", "ones"])],
         {"a": (2, 2, 2)}, ["y"],
         {"zero": np.asarray(0, np.int64), "ax": i64(0), "minus1": i64(-1), "r0": np.asarray(0, np.int64),
          "r4": np.asarray(4, np.int64), "r1": np.asarray(1, np.int64), "r2": np.asarray(2, np.int64),
          "sh2": i64(2, 4)}),
]


def _model(case: Case, dtype: type) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, k) for k, v in case.consts.items()]
    graph = helper.make_graph(
        case.nodes, case.name, [helper.make_tensor_value_info(k, elem, list(s)) for k, s in case.inputs.items()],
        [helper.make_tensor_value_info(o, elem, None) for o in case.outputs], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def _gradient_model(case: Case, dtype: type) -> tuple[onnx.ModelProto, list[str]]:
    forward = _model(case, dtype)
    infos = infer_tensor_infos(forward)
    e = Emitter("grad", case.opset, infos, graph_constants(forward.graph))
    seeds = {o: f"seed.{o}" for o in case.outputs}
    grads = backward(forward.graph, e, seeds, list(case.inputs), differentiate_sources=True)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    out_names = [f"grad.{k}" for k in case.inputs]
    nodes = [*forward.graph.node, *e.nodes,
             *[helper.make_node("Identity", [grads[k]], [f"grad.{k}"]) for k in case.inputs]]
    graph = helper.make_graph(
        nodes, case.name + "_grad",
        [*forward.graph.input, *[helper.make_tensor_value_info(s, elem, None) for s in seeds.values()]],
        [helper.make_tensor_value_info(o, elem, None) for o in out_names],
        initializer=[*forward.graph.initializer, *e.initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 9
    return model, out_names


def _inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.uniform(0.5, 1.5, s) if k in case.positive else rng.normal(size=s)) for k, s in case.inputs.items()}


def _directions(case: Case, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Three random unit directions per input: the directional derivative checks the rule."""
    out = []
    for k, shape in case.inputs.items():
        for _ in range(3):
            v = rng.normal(size=shape)
            out.append((k, v / np.linalg.norm(v)))
    return out


def _finite_differences(case: Case, feeds: dict[str, np.ndarray], seeds: dict[str, np.ndarray],
                        directions: list[tuple[str, np.ndarray]]) -> list[float]:
    ref = ReferenceEvaluator(_model(case, np.float64))

    def loss(f: dict[str, np.ndarray]) -> float:
        outs = ref.run(case.outputs, f)
        return float(sum(np.sum(o * seeds[name]) for name, o in zip(case.outputs, outs, strict=True)))

    h = case.fd_step
    return [(loss({**feeds, k: feeds[k] + h * v}) - loss({**feeds, k: feeds[k] - h * v})) / (2 * h)
            for k, v in directions]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_matches_finite_differences(case: Case) -> None:
    # A stable seed: str hashes differ per process (PYTHONHASHSEED), so a run is reproducible.
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    feeds = _inputs(case, rng)
    out_shapes = ReferenceEvaluator(_model(case, np.float64)).run(case.outputs, feeds)
    seeds = {o: rng.normal(size=np.shape(v)) for o, v in zip(case.outputs, out_shapes, strict=True)}
    directions = _directions(case, rng)
    want = np.asarray(_finite_differences(case, feeds, seeds, directions))
    scale = max(1.0, float(np.abs(want).max()))

    def projected(grads: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray([np.sum(grads[k] * v) for k, v in directions])

    model64, names = _gradient_model(case, np.float64)
    got64 = ReferenceEvaluator(model64).run(names, {**feeds, **{f"seed.{k}": v for k, v in seeds.items()}})
    grads64 = dict(zip(case.inputs, got64, strict=True))
    for k, g in grads64.items():
        assert g.shape == feeds[k].shape, f"{case.name}: gradient of {k} has shape {g.shape}"
    np.testing.assert_allclose(projected(grads64), want, rtol=case.rtol, atol=case.rtol * scale,
                               err_msg=f"{case.name} (float64)")

    model32, names = _gradient_model(case, np.float32)
    session = ort.InferenceSession(model32.SerializeToString(), providers=["CPUExecutionProvider"])
    got32 = session.run(names, {**{k: v.astype(np.float32) for k, v in feeds.items()},
                                **{f"seed.{k}": v.astype(np.float32) for k, v in seeds.items()}})
    for k, g in zip(case.inputs, got32, strict=True):
        np.testing.assert_allclose(g, grads64[k], rtol=1e-4, atol=1e-4 * scale, err_msg=f"{case.name}: d/d{k} (ORT)")


def test_an_op_without_a_rule_is_refused_by_name() -> None:
    case = Case("cos", [n("Cos", ["a"], "c"), n("Mul", ["c", "a"])], {"a": (2, 2)}, ["y"])
    forward = _model(case, np.float32)
    e = Emitter("grad", 17, infer_tensor_infos(forward), graph_constants(forward.graph))
    with pytest.raises(UnsupportedNodeError, match=r"'Cos'.*'Cos_c'"):
        backward(forward.graph, e, {"y": "seed.y"}, ["a"], differentiate_sources=True)


def test_data_only_branches_get_no_gradient() -> None:
    # y = (x·W)·a: only the product with a needs a gradient; x and W are data and frozen.
    case = Case("frozen", [n("MatMul", ["x", "w"], "h"), n("Mul", ["h", "a"])], {"a": (3,)}, ["y"],
                {"x": np.ones((2, 4)), "w": np.ones((4, 3))})
    forward = _model(case, np.float32)
    e = Emitter("grad", 17, infer_tensor_infos(forward), graph_constants(forward.graph))
    grads = backward(forward.graph, e, {"y": "seed.y"}, ["a"], differentiate_sources=True)
    assert set(grads) == {"y", "a"}
    assert not any(node.op_type == "MatMul" for node in e.nodes)


# -- com.microsoft.MatMulNBits: the frozen quantised weight of an imported GGUF model ---------

class MatMulNBits(OpRun):
    """MatMulNBits in float64 for ONNX's reference evaluator (which finds it by class name), from the op's definition."""

    op_domain = "com.microsoft"

    def _run(self, x, b, scales, zero_points=None, K=None, N=None, bits=None, block_size=None, accuracy_level=None):  # type: ignore[no-untyped-def]
        rows = b.reshape(N, K // block_size, -1)
        if bits == 4:
            codes = np.stack([rows & 0x0F, rows >> 4], axis=-1).reshape(N, K // block_size, block_size)
        else:
            codes = rows
        zero = (8.0 if bits == 4 else 128.0) if zero_points is None else zero_points.reshape(N, -1, 1)
        w = ((codes.astype(np.float64) - zero) * scales.reshape(N, -1, 1)).reshape(N, K)
        return (x @ w.T,)


def _nbits_model(bits: int, float_zero_point: bool, dtype: type, *,
                 flat_scales: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = MatMulNBits(x)·c over K = 64 (two blocks of 32), N = 5: the input's gradient flows through.
    Scales and zero points are ``[N, blocks]``, or with ``flat_scales`` ``[N·blocks]`` (the
    op's other layout, the one ONNX Runtime's own quantizer writes)."""
    rng = np.random.default_rng(bits * 10 + float_zero_point)
    k, nn, block = 64, 5, 32
    packed = rng.integers(0, 256, (nn, k // block, block * bits // 8), dtype=np.uint8)
    consts: dict[str, np.ndarray] = {"b": packed, "scales": rng.uniform(0.01, 0.1, (nn, k // block)).astype(np.float32)}
    inputs = ["x", "b", "scales"]
    if float_zero_point:
        consts["zp"] = rng.uniform(0, 15, (nn, k // block)).astype(np.float32)
        inputs.append("zp")
    if flat_scales:
        consts.update({name: consts[name].reshape(-1) for name in ("scales", "zp") if name in consts})
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMulNBits", inputs, ["h"], name="nbits", domain="com.microsoft", K=k, N=nn, bits=bits,
                              block_size=block), n("Mul", ["h", "c"])]
    consts["c"] = rng.normal(size=(nn,)).astype(dtype)
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", elem, [2, 3, k])],
                              [helper.make_tensor_value_info("y", elem, [2, 3, nn])],
                              [numpy_helper.from_array(v, name) for name, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model, {"x": rng.normal(size=(2, 3, k))}


def _first(outputs: Any) -> np.ndarray:
    """The first output of a ReferenceEvaluator run (typed as a list or a dict)."""
    return np.asarray(outputs[0])


def _check_nbits_rule(bits: int, float_zero_point: bool, *, flat_scales: bool = False) -> int:
    """The rule's input gradient against finite differences (float64, ONNX's reference
    evaluator) and ONNX Runtime's float32 run of the same backward graph; returns how many
    products the backward multiplies W's rows in."""
    forward64, feeds = _nbits_model(bits, float_zero_point, np.float64, flat_scales=flat_scales)
    rng = np.random.default_rng(bits)
    seed = rng.normal(size=(2, 3, 5))
    ref = ReferenceEvaluator(forward64, new_ops=[MatMulNBits])

    def loss(x: np.ndarray) -> float:
        return float(np.sum(_first(ref.run(["y"], {"x": x})) * seed))

    directions = [rng.normal(size=feeds["x"].shape) for _ in range(3)]
    want = [(loss(feeds["x"] + 1e-6 * v) - loss(feeds["x"] - 1e-6 * v)) / 2e-6 for v in directions]
    products = []

    # ONNX Runtime's CPU MatMulNBits takes no float zero point with 8 bits: its run of the
    # backward graph leaves the forward out (the rule reads the packed weight, not y).
    ort_forward = not (bits == 8 and float_zero_point)

    def gradient_model(dtype: type, with_forward: bool = True) -> onnx.ModelProto:
        forward, _ = _nbits_model(bits, float_zero_point, dtype, flat_scales=flat_scales)
        e = Emitter("grad", 17, infer_tensor_infos(forward), graph_constants(forward.graph))
        grads = backward(forward.graph, e, {"y": "seed.y"}, ["x"], differentiate_sources=True)
        products.append(sum(node.op_type == "MatMul" for node in e.nodes))
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = helper.make_graph(
            [*(forward.graph.node if with_forward else []), *e.nodes,
             helper.make_node("Identity", [grads["x"]], ["grad.x"])], "nbits_grad",
            [*forward.graph.input, helper.make_tensor_value_info("seed.y", elem, None)],
            [helper.make_tensor_value_info("grad.x", elem, None)], [*forward.graph.initializer, *e.initializers])
        model = helper.make_model(graph, opset_imports=list(forward.opset_import))
        model.ir_version = 9
        return model

    grad64 = _first(ReferenceEvaluator(gradient_model(np.float64), new_ops=[MatMulNBits]).run(
        ["grad.x"], {"x": feeds["x"], "seed.y": seed}))
    np.testing.assert_allclose([np.sum(grad64 * v) for v in directions], want, rtol=1e-6, atol=1e-6)
    # ONNX Runtime runs the same backward graph (with its own MatMulNBits forward), in fp32.
    session = ort.InferenceSession(gradient_model(np.float32, ort_forward).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    grad32 = session.run(["grad.x"], {"x": feeds["x"].astype(np.float32), "seed.y": seed.astype(np.float32)})[0]
    np.testing.assert_allclose(grad32, grad64, rtol=1e-4, atol=1e-4 * float(np.abs(grad64).max()))
    assert products[0] == products[1]
    return products[0]


NBITS_CASES = [(4, False), (4, True), (8, False), (8, True)]


@pytest.mark.parametrize(("bits", "float_zero_point"), NBITS_CASES)
def test_matmulnbits_rule_matches_finite_differences_of_the_dequantised_weight(bits: int, float_zero_point: bool) -> None:
    assert _check_nbits_rule(bits, float_zero_point) == 1  # W (5 × 64) whole: one product


@pytest.mark.parametrize(("slice_elements", "products"), [(128, 3), (64, 5), (1, 5)])
@pytest.mark.parametrize(("bits", "float_zero_point"), NBITS_CASES)
def test_matmulnbits_rule_in_row_slices_matches_the_reference(monkeypatch: pytest.MonkeyPatch, bits: int,
                                                              float_zero_point: bool, slice_elements: int,
                                                              products: int) -> None:
    """A W of more than NBITS_SLICE_ELEMENTS elements is dequantised and multiplied in slices
    of its N = 5 rows: 128 elements are 2 rows of K = 64 (slices of 2, 2 and a last partial 1);
    64 or fewer elements, one row per slice."""
    import lorad.trainer.autodiff.rules as rules

    monkeypatch.setattr(rules, "NBITS_SLICE_ELEMENTS", slice_elements)
    assert _check_nbits_rule(bits, float_zero_point) == products


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_rule_takes_flat_scales(bits: int) -> None:
    assert _check_nbits_rule(bits, False, flat_scales=True) == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_rule_in_row_slices_takes_flat_scales(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    import lorad.trainer.autodiff.rules as rules

    monkeypatch.setattr(rules, "NBITS_SLICE_ELEMENTS", 128)
    assert _check_nbits_rule(bits, False, flat_scales=True) == 3


@pytest.mark.parametrize("name", ["gelu_decomposed_div", "gelu_decomposed_mul", "gelu_decomposed_shared_inner"])
def test_decomposed_gelu_is_differentiated_whole_only_when_nothing_else_reads_inside(name: str) -> None:
    """Taken whole, the backward of the exact GELU never differentiates its Div/Erf nodes
    (no Div, no chain through erf's rule); with an inner tensor read elsewhere it must."""
    case = next(c for c in CASES if c.name == name)
    model, _ = _gradient_model(case, np.float32)
    emitted = [node.op_type for node in model.graph.node[len(case.nodes):]]
    whole = name != "gelu_decomposed_shared_inner"
    assert ("Div" not in emitted and emitted.count("Exp") == 1) == whole, emitted
