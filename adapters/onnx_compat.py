"""Keep ONNX files loadable by the ONNX Runtime versions lorad runs on.

onnx >= 1.17 stamps new models with IR versions that ONNX Runtime 1.19 (the last
release with the on-device training APIs on PyPI) rejects, and ONNX Runtime's CPU kernel
of ``MatMulNBits`` takes 8-bit weights only from 1.21 on, so every model lorad writes or
derives goes through :func:`for_runtime`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MAX_IR_VERSION", "OPSET", "QUANTIZED_COMPUTE", "for_runtime", "runtime_has_nbits8", "set_quantized_compute",
           "open_session"]

MAX_IR_VERSION = 9
OPSET = 17
_MS = "com.microsoft"

#: How ``MatMulNBits`` products are computed (``model.quantized_compute``): ``int8`` quantises
#: the activations per 32-value block inside the product (ONNX Runtime's accuracy level 4,
#: what llama.cpp does for its 4- and 8-bit kernels: the fastest); ``fp32`` multiplies the
#: dequantised weights by the fp32 activations, exactly (8-bit products become fp32 matrices).
QUANTIZED_COMPUTE = ("int8", "fp32")
_ACCURACY_LEVEL = {"int8": 4, "fp32": 0}


def for_runtime(model: onnx.ModelProto, *, lower_nbits8: bool = True) -> onnx.ModelProto:
    """Lower the IR version in place to one the runtime accepts and (unless ``lower_nbits8``
    is false: a base whose LoRA targets are still to be found) write as float ops each 8-bit
    ``MatMulNBits`` the installed runtime has no kernel for, or none fast enough: fp32
    compute (``accuracy_level`` 0 set by :func:`set_quantized_compute`); return the model."""
    int4_tensors = any(i.data_type in (TensorProto.INT4, TensorProto.UINT4) for i in model.graph.initializer)
    # Int4 tensors (a quantised embedding table) exist from IR version 10 on.
    if model.ir_version > MAX_IR_VERSION and not int4_tensors:
        model.ir_version = MAX_IR_VERSION
    if lower_nbits8 and any(_is_nbits8(n) for n in model.graph.node):
        _lower_nbits8(model.graph, everywhere=not runtime_has_nbits8())
    return model


def open_session(model: onnx.ModelProto, options: Any, providers: Sequence[str]) -> Any:
    """An ONNX Runtime session over ``model``, loaded from a temporary file rather than from bytes:
    a session made from bytes holds about one more copy of the weights for its lifetime
    (onnxruntime 1.32, SmolLM2-135M: 298 MB against 189 MB from a file). ORT's own errors
    propagate as it raises them."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lorad-model-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return ort.InferenceSession(path, options, providers=list(providers))


def set_quantized_compute(model: onnx.ModelProto, compute: str) -> onnx.ModelProto:
    """Set every ``MatMulNBits`` of ``model`` to ``compute`` (one of :data:`QUANTIZED_COMPUTE`), in place."""
    if compute not in _ACCURACY_LEVEL:
        raise ValueError(f"quantized compute {compute!r} is not one of {', '.join(QUANTIZED_COMPUTE)}")
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == _MS:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", _ACCURACY_LEVEL[compute])])
    # ONNX Runtime has no fast fp32 kernel for 8 bits (a 576×49152 head takes 125 ms): with
    # fp32 compute, for_runtime writes 8-bit products as float ops, once LoRA is in place.
    return model


def _is_nbits8(node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMulNBits" and node.domain == _MS and _attr(node, "bits", 4) == 8


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


@functools.cache
def runtime_has_nbits8() -> bool:
    """Whether this ONNX Runtime's CPU provider runs ``MatMulNBits`` with ``bits=8`` (tried once)."""
    import onnxruntime as ort

    k = n = 32
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain=_MS, K=k, N=n, bits=8, block_size=32)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.full((n, 1, 32), 129, np.uint8), "b"), numpy_helper.from_array(np.ones((n, 1), np.float32), "s")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)])
    probe.ir_version = MAX_IR_VERSION
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusal is the answer, not an error to log
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        [y] = session.run(None, {"x": np.ones((1, k), np.float32)})
    except Exception:  # ORT's own errors: "bits must be 4" and the like
        return False
    return bool(np.allclose(y, k))


def _lower_nbits8(graph: onnx.GraphProto, *, everywhere: bool) -> None:
    """Each 8-bit MatMulNBits set to fp32 compute (``accuracy_level`` 0 explicitly), or
    ``everywhere``, as ``x · dequant(B)ᵀ`` in float ops over its constant operands (ONNX
    Runtime folds them into one fp32 matrix when the session is created)."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        fp32_compute = any(a.name == "accuracy_level" and a.i == 0 for a in node.attribute)
        if not _is_nbits8(node) or not (everywhere or fp32_compute):
            nodes.append(node)
            continue
        k, n, block = _attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "block_size", 0)
        p = node.name or node.output[0]

        def const(suffix: str, value: np.ndarray, p: str = p) -> str:
            graph.initializer.append(numpy_helper.from_array(value, f"{p}/{suffix}"))
            return f"{p}/{suffix}"

        blocks = -(-k // block)  # K is padded to whole blocks in B
        view = const("block_view", np.array([n, blocks, 1], np.int64))
        lowered: list[onnx.NodeProto] = []
        if len(node.input) > 3 and node.input[3]:
            # uint8 zero points, one per block (ONNX Runtime's quantiser), or floats.
            lowered += [helper.make_node("Cast", [node.input[3]], [f"{p}/zero_cast"], name=f"{p}/zero_cast",
                                         to=TensorProto.FLOAT),
                        helper.make_node("Reshape", [f"{p}/zero_cast", view], [f"{p}/zero"], name=f"{p}/zero")]
            zero = f"{p}/zero"
        else:
            zero = const("zero_point", np.array(128, np.float32))
        # Scales may be [N, blocks] or flat; view them per block before the product.
        lowered += [
            helper.make_node("Reshape", [node.input[2], view], [f"{p}/scales"], name=f"{p}/scales"),
            helper.make_node("Cast", [node.input[1]], [f"{p}/codes"], name=f"{p}/codes", to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{p}/codes", zero], [f"{p}/centred"], name=f"{p}/centred"),
            helper.make_node("Mul", [f"{p}/centred", f"{p}/scales"], [f"{p}/values"], name=f"{p}/values"),
            helper.make_node("Reshape", [f"{p}/values", const("shape", np.array([n, blocks * block], np.int64))],
                             [f"{p}/padded"], name=f"{p}/padded"),
            helper.make_node("Slice", [f"{p}/padded", const("start", np.array([0], np.int64)),
                                       const("stop", np.array([k], np.int64)), const("axis", np.array([1], np.int64))],
                             [f"{p}/matrix"], name=f"{p}/matrix"),
            helper.make_node("Transpose", [f"{p}/matrix"], [f"{p}/matrix_t"], name=f"{p}/matrix_t", perm=[1, 0]),
            helper.make_node("MatMul", [node.input[0], f"{p}/matrix_t"], [node.output[0]], name=f"{p}/MatMul"),
        ]
        nodes += lowered
    del graph.node[:]
    graph.node.extend(nodes)
