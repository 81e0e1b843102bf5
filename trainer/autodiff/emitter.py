"""Writing new ONNX nodes into a graph whose tensors' types and shapes are known.

The gradient rules (:mod:`lorad.trainer.autodiff.rules`) emit nodes through an :class:`Emitter`:
it names every new tensor uniquely under one prefix, creates typed constants, knows the
model's opset (so a reduction is written with axes as an attribute or as an input, as
that opset wants) and answers rank, dims and element type of forward tensors from ONNX
shape inference. Broadcasting is undone by :meth:`Emitter.sum_to`, statically where the
inferred shapes decide it and with a few shape ops at run time where they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Dim", "TensorInfo", "Emitter", "infer_tensor_infos"]

#: A dimension as shape inference knows it: a size, a symbolic name, or unknown.
Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    elem_type: int
    dims: tuple[Dim, ...] | None  # None: rank unknown

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)

    @property
    def is_float(self) -> bool:
        return self.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _info(type_proto: onnx.TypeProto) -> TensorInfo | None:
    if not type_proto.HasField("tensor_type"):
        return None
    t = type_proto.tensor_type
    dims: tuple[Dim, ...] | None = None
    if t.HasField("shape"):
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in t.shape.dim
        )
    return TensorInfo(t.elem_type, dims)


def infer_tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Element type and shape of every tensor ONNX shape inference can type.

    ONNX's inference knows no ``com.microsoft`` op, so nothing past a ``MatMulNBits`` (an
    imported GGUF model's every linear) would be typed: it runs on a stand-in where each
    MatMulNBits is a ``MatMul`` by a ``[K, N]`` input (the same output type and shape), and
    large initializers are inputs of their type and shape (no bytes copied).
    """
    inferred = onnx.shape_inference.infer_shapes(_shape_stand_in(model), strict_mode=False, data_prop=True)
    g = inferred.graph
    infos: dict[str, TensorInfo] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        info = _info(vi.type)
        if info is not None:
            infos[vi.name] = info
    for init in model.graph.initializer:
        infos[init.name] = TensorInfo(init.data_type, tuple(int(d) for d in init.dims))
    return infos


#: Initializers up to this size keep their values for inference (shape constants, axes).
_SMALL_INIT_BYTES = 4096


def _shape_stand_in(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    small = [i for i in g.initializer if len(i.raw_data) <= _SMALL_INIT_BYTES]
    kept = {i.name for i in small}
    inputs = list(g.input) + [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                              for i in g.initializer if i.name not in kept]
    nodes = []
    for node in g.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            weight = f"{node.name or node.output[0]}/stand_in_weight"
            inputs.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, [attrs["K"], attrs["N"]]))
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [node.output[0]], name=node.name))
        else:
            nodes.append(node)
    graph = helper.make_graph(nodes, g.name, inputs, list(g.output), small, value_info=list(g.value_info))
    stand_in = helper.make_model(graph, opset_imports=list(model.opset_import))
    stand_in.ir_version = model.ir_version
    return stand_in


class Emitter:
    """Appends nodes and constants named ``{prefix}/...``; see the module docstring."""

    def __init__(self, prefix: str, opset: int, infos: dict[str, TensorInfo],
                 constants: dict[str, np.ndarray] | None = None) -> None:
        self.prefix = prefix
        self.opset = opset
        self.infos = infos
        self.constants = constants if constants is not None else {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    # -- naming and plain nodes ----------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, *, domain: str = "",
           **attrs: Any) -> str:
        out = self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, domain=domain or None, **attrs))
        return out

    def op_n(self, op_type: str, inputs: Sequence[str], n_out: int, hint: str | None = None, **attrs: Any) -> list[str]:
        base = self.fresh(hint or op_type)
        outs = [f"{base}.{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs

    def const(self, value: np.ndarray | float | int | Sequence[int], dtype: Any = None) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), tuple(array.shape))
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), np.int64))

    def scalar_like(self, value: float, like: str) -> str:
        """A scalar constant of ``like``'s element type."""
        return self.const(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(self.elem_type(like))))

    # -- what is known of forward tensors -------------------------------------------------

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a forward tensor that is an initializer or a Constant node's output."""
        return self.constants.get(name)

    def info(self, name: str) -> TensorInfo | None:
        return self.infos.get(name)

    def elem_type(self, name: str) -> int:
        info = self.infos.get(name)
        return info.elem_type if info is not None else TensorProto.FLOAT

    def dims(self, name: str) -> tuple[Dim, ...] | None:
        info = self.infos.get(name)
        return None if info is None else info.dims

    def rank(self, name: str) -> int | None:
        d = self.dims(name)
        return None if d is None else len(d)

    def record(self, name: str, like: str) -> str:
        """Declare that ``name`` has the type and shape of ``like`` (a gradient of it)."""
        if like in self.infos:
            self.infos[name] = self.infos[like]
        return name

    # -- opset-aware helpers --------------------------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | str | None, *, keepdims: bool) -> str:
        """ReduceSum/ReduceMean/ReduceMax with static axes (list) or an axes tensor (name)."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, [x], keepdims=int(keepdims))
        if isinstance(axes, str):
            if not axes_as_input:
                raise ValueError(f"{op_type} with run-time axes needs opset >= {13 if op_type == 'ReduceSum' else 18}")
            return self.op(op_type, [x, axes], keepdims=int(keepdims), noop_with_empty_axes=1)
        if axes_as_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def shape(self, x: str) -> str:
        return self.op("Shape", [x])

    def reshape_like(self, g: str, x: str) -> str:
        return self.op("Reshape", [g, self.shape(x)])

    def transpose_last2(self, x: str, rank: int) -> str:
        perm = list(range(rank))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        return self.op("Transpose", [x], perm=perm)

    def zeros_like(self, x: str) -> str:
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_type(x))
        return self.op("ConstantOfShape", [self.shape(x)],
                       value=numpy_helper.from_array(np.zeros(1, dtype=dtype)))

    # -- broadcasting -----------------------------------------------------------------------

    def sum_to(self, g: str, g_dims: tuple[Dim, ...] | None, x: str) -> str:
        """Sum ``g`` (shaped ``g_dims``, the broadcast shape) down to ``x``'s shape."""
        x_dims = self.dims(x)
        if g_dims is not None and x_dims is not None and len(g_dims) >= len(x_dims):
            lead = len(g_dims) - len(x_dims)
            axes = list(range(lead))
            decided = True
            for k, di in enumerate(x_dims):
                do = g_dims[lead + k]
                if di == do and di is not None:
                    continue
                if di == 1:
                    if do != 1:
                        axes.append(lead + k)
                    continue
                decided = False
                break
            if decided:
                if not axes:
                    return g
                summed = self.reduce("ReduceSum", g, axes, keepdims=True)
                return self.reshape_like(summed, x) if lead else summed
        # Decided at run time: reduce every axis where x (left-padded with ones) differs.
        g_rank = len(g_dims) if g_dims is not None else None
        x_rank = len(x_dims) if x_dims is not None else None
        if g_rank is None or x_rank is None:
            raise ValueError(f"cannot undo broadcasting onto {x!r}: its rank or the gradient's is unknown")
        x_shape = self.shape(x)
        x_shape_padded = self.op("Concat", [self.ints([1] * (g_rank - x_rank)), x_shape], axis=0) if g_rank > x_rank else x_shape
        differs = self.op("Not", [self.op("Equal", [x_shape_padded, self.shape(g)])])
        axes_t = self.op("Reshape", [self.op("NonZero", [differs]), self.ints([-1])])
        summed = self.reduce("ReduceSum", g, axes_t, keepdims=True)
        return self.op("Reshape", [summed, x_shape])

    def broadcast_dims(self, *names: str) -> tuple[Dim, ...] | None:
        """The numpy-broadcast shape of ``names`` as far as the inferred dims tell."""
        all_dims = [self.dims(n) for n in names]
        if any(d is None for d in all_dims):
            return None
        rank = max(len(d) for d in all_dims if d is not None)
        out: list[Dim] = []
        for k in range(rank):
            column = [d[k - rank + len(d)] for d in all_dims if d is not None and k - rank + len(d) >= 0]
            sized = [c for c in column if c != 1]
            if not sized:
                out.append(1)
            elif all(c == sized[0] for c in sized):
                out.append(sized[0])
            else:
                known = [c for c in sized if isinstance(c, int)]
                out.append(known[0] if known else None)
        return tuple(out)
