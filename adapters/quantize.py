"""Quantised base models: ONNX Runtime's weight-only quantiser, with what lorad needs kept.

``lorad quantize-model IN OUT --weights int8|int4`` writes the frozen base with its linear
weights as ``com.microsoft.MatMulNBits`` (8 or 4 bits per weight, a scale and a zero point
per block of ``block`` input features) and, for int4, its embedding tables as
``GatherBlockQuantized``. The quantisation itself is ONNX Runtime's
(``onnxruntime.quantization.matmul_nbits_quantizer``, round-to-nearest per block, asymmetric);
this module only prepares the graph for it and restores what it drops:

* **Every linear as a MatMul of a constant.** The quantiser takes ``MatMul`` nodes whose
  right operand is an initializer. Exporters also write ``Gemm`` (``transB=1``), or a MatMul
  of ``Transpose(W)``; those are rewritten first as ``MatMul`` of the transposed constant
  (plus ``Add`` of the bias), so no linear of any model lorad serves stays fp32.
* **Module paths.** The quantiser names its nodes ``<node>_Q4`` and drops node metadata;
  each quantised node gets back its original node's name and metadata (torch's name
  scopes), so :class:`~lorad.adapters.module_paths.ModulePaths` recovers the same PEFT module
  for every weight and PEFT adapters load with no mapping. This is checked, not hoped:
  a weight whose module path changed is an error.
* **Model metadata** (tokenizer, labels) is kept, and ``lorad.quantization`` records how the
  file was made.

Why int8 is ``MatMulNBits`` with 8 bits rather than ``quantize_dynamic`` (``MatMulInteger``):
dynamic quantisation scales the activations per tensor, over the whole batch, so one
request's answer would depend on the other requests it is batched with (0.032 on MiniLM's
embeddings, against 4.5e-8 for MatMulNBits: ``python -m benchmarks.quantised --only-bare``), and one example's per-example gradient on the others in its
batch, which DP-SGD's sensitivity bound does not allow. ``MatMulNBits`` quantises the
activations per row and block (``model.quantized_compute: int8``), so both stay per row.

LoRA paths are added to the quantised graph at serving and training time (lora_graph.py)
and are float there: a quantised model file has none to keep.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .module_paths import ModulePaths, linear_weight_resolver

__all__ = ["BLOCK_SIZES", "DEFAULT_BLOCK", "QUANTIZATION_KEY", "WEIGHT_TYPES", "QuantizedWeight", "describe",
           "quantization_of", "quantize_model"]

#: ``--weights`` choices: the bits of each base weight.
WEIGHT_TYPES = {"int8": 8, "int4": 4}
#: ``--block`` choices: input features per scale and zero point.
BLOCK_SIZES = (32, 64, 128)
#: The block when none is given: 8-bit codes lose little to a long block, and ONNX Runtime's
#: int8 kernel runs faster with it (MiniLM, seq 128 batch 1, bare sessions: 20.4 ms CPU at
#: 128 against 24.5 at 32, fp32 29.4; cosine to fp32 0.9980 and 0.9992; ``python -m
#: benchmarks.quantised --only-bare``); 4-bit codes need the short one.
DEFAULT_BLOCK = {"int8": 128, "int4": 32}
#: Model metadata key recording how a file was quantised.
QUANTIZATION_KEY = "lorad.quantization"
#: Integer tensor types in the ONNX standard need opset 21 and IR version 10.
_INT4_OPSET = 21
_INT4_IR = 10
_MS = "com.microsoft"


@dataclass(frozen=True)
class QuantizedWeight:
    """How one linear or embedding weight of a model is stored."""

    weight: str
    op: str
    dtype: str  # "fp32", "int8", "int4"
    block: int | None
    bytes: int


def quantize_model(model: onnx.ModelProto, weights: str, *, block: int | None = None,
                   embeddings: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with its linear weights (and, for int4 with ``embeddings``, its
    embedding tables) quantised by ONNX Runtime's MatMulNBits quantiser; see the module
    docstring. ValueError names what is not allowed (weights, block, an already quantised
    model, a model with nothing to quantise)."""
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"--weights {weights!r}: use one of {', '.join(WEIGHT_TYPES)}")
    block = DEFAULT_BLOCK[weights] if block is None else block
    if block not in BLOCK_SIZES:
        raise ValueError(f"--block {block}: use one of {', '.join(map(str, BLOCK_SIZES))}")
    if any(p.key == QUANTIZATION_KEY for p in model.metadata_props) or any(
            n.domain == _MS and n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node):
        raise ValueError("the model is already quantised; quantise the fp32 model it was made from")
    bits = WEIGHT_TYPES[weights]
    model = copy.deepcopy(model)
    before = ModulePaths.from_model(model)
    _linears_as_matmul(model.graph)
    originals = {n.output[0]: n for n in model.graph.node if n.op_type == "MatMul"}
    gather_tables = bits == 4 and embeddings and _has_constant_gather(model.graph)
    if gather_tables:
        model = _to_int4_opset(model)
    quantized = _run_quantizer(model, bits, block, gather_tables)
    if not any(n.domain == _MS and n.op_type == "MatMulNBits" for n in quantized.graph.node):
        raise ValueError("the model has no MatMul or Gemm with a constant 2-D weight: nothing to quantise")
    _restore_node_identity(quantized.graph, originals)
    _check_module_paths(before, ModulePaths.from_model(quantized))
    record = {"weights": weights, "block": block, "embeddings": bool(gather_tables),
              "tool": "onnxruntime.quantization.matmul_nbits_quantizer (RTN, asymmetric)",
              "onnxruntime": _ort_version()}
    quantized.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(record, sort_keys=True))
    return quantized


def quantization_of(model: onnx.ModelProto) -> list[QuantizedWeight]:
    """How each linear weight (per :func:`linear_weight_resolver`) and each embedding table
    of ``model`` is stored: type, block and bytes (codes, scales and zero points)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    resolve = linear_weight_resolver(graph)
    out: list[QuantizedWeight] = []
    seen: set[str] = set()
    for node in graph.node:
        found = resolve(node)
        if found is not None and found[0] not in seen:
            seen.add(found[0])
            if node.domain == _MS and node.op_type == "MatMulNBits":
                bits, blk = _int_attr(node, "bits", 4), _int_attr(node, "block_size", 0)
                size = sum(_nbytes(inits[n]) for n in node.input[1:] if n in inits)
                out.append(QuantizedWeight(found[0], node.op_type, f"int{bits}", blk, size))
            else:
                out.append(QuantizedWeight(found[0], node.op_type, "fp32", None, _nbytes(inits[found[0]])))
        elif node.op_type in ("Gather", "GatherBlockQuantized") and node.input and node.input[0] in inits:
            table = inits[node.input[0]]
            if node.input[0] in seen or len(table.dims) != 2:
                continue
            seen.add(node.input[0])
            if node.op_type == "GatherBlockQuantized":
                size = sum(_nbytes(inits[n]) for n in (node.input[0], *node.input[2:]) if n in inits)
                out.append(QuantizedWeight(node.input[0], node.op_type, "int4", _int_attr(node, "block_size", 0), size))
            elif table.data_type == TensorProto.FLOAT:
                out.append(QuantizedWeight(node.input[0], node.op_type, "fp32", None, _nbytes(table)))
    return out


# ---------------------------------------------------------------- before the quantiser


def _linears_as_matmul(graph: onnx.GraphProto) -> None:
    """Rewrite each linear whose weight is a constant read through a Transpose, or a Gemm,
    as ``MatMul(x, W[in, out])`` (+ ``Add`` of the bias), in place; names and metadata kept
    (a Gemm's ``/m/Gemm`` becomes ``/m/MatMul``, as exporters name a MatMul)."""
    resolve = linear_weight_resolver(graph)
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            users[name] += 1
    transposed: dict[str, str] = {}  # weight -> name of its [in, out] copy

    def as_in_out(weight: str) -> str:
        if weight not in transposed:
            name = f"{weight}.T"
            graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), name))
            transposed[weight] = name
        return transposed[weight]

    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        found = resolve(node)
        if found is None or node.domain not in ("", "ai.onnx"):
            rewritten.append(node)
            continue
        weight, through_transpose = found
        if node.op_type == "MatMul":
            if through_transpose:
                node.input[1] = as_in_out(weight)
            rewritten.append(node)
            continue
        # Gemm: Y = alpha·A·op(B) + beta·C, A never transposed (module_paths refuses transA).
        alpha, beta = _float_attr(node, "alpha", 1.0), _float_attr(node, "beta", 1.0)
        trans_b = bool(_int_attr(node, "transB", 0)) != through_transpose
        b = as_in_out(weight) if trans_b else weight
        if alpha != 1.0:
            scaled = f"{b}.alpha"
            graph.initializer.append(numpy_helper.from_array(
                (numpy_helper.to_array(inits[weight]).T if trans_b else numpy_helper.to_array(inits[weight])) * np.float32(alpha),
                scaled))
            b = scaled
        name = node.name[: -len("Gemm")] + "MatMul" if node.name.endswith("/Gemm") else (node.name or "") + "_matmul"
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], b], [product], name=name)
        matmul.metadata_props.extend(node.metadata_props)
        rewritten.append(matmul)
        if has_bias:
            bias = node.input[2]
            if beta != 1.0:
                if bias not in inits:
                    raise ValueError(f"{node.name or node.output[0]}: Gemm with beta={beta} and a computed bias")
                scaled_bias = f"{bias}.beta"
                graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[bias]) * np.float32(beta),
                                                                 scaled_bias))
                bias = scaled_bias
            add = helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}.bias")
            rewritten.append(add)
    del graph.node[:]
    graph.node.extend(rewritten)
    # The fp32 originals now unused (a transposed or scaled copy replaced them).
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # A Transpose of a weight that now has no reader.
    live = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(live)


def _has_constant_gather(graph: onnx.GraphProto) -> bool:
    inits = {i.name for i in graph.initializer}
    return any(n.op_type == "Gather" and n.input and n.input[0] in inits for n in graph.node)


def _to_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 21 (onnx's version converter), where int4 tensors are allowed;
    the quantiser would only relabel the opset, leaving e.g. ReduceL2's ``axes`` attribute
    invalid."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _INT4_OPSET)
    if version < _INT4_OPSET:
        model = onnx.version_converter.convert_version(model, _INT4_OPSET)
    model.ir_version = max(model.ir_version, _INT4_IR)
    return model


def _run_quantizer(model: onnx.ModelProto, bits: int, block: int, gather: bool) -> onnx.ModelProto:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError as e:  # onnx_ir, the quantiser's own dependency, is lorad[quantize]
        raise ValueError(f"ONNX Runtime's quantiser cannot be imported ({e}); install lorad[quantize]") from e
    import logging

    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    # accuracy_level 4: int8 compute, as model.quantized_compute's default (the daemon sets it
    # per its config anyway); written into the file so that plain ONNX Runtime runs it fast too.
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits, op_types_to_quantize=ops,
                                          quant_axes=(("MatMul", 0), ("Gather", 1)), accuracy_level=4)
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)  # it logs every node at INFO
    try:
        # An all-zero block (an unused embedding row) divides 0 by a 0 scale inside the
        # quantiser, which then writes the right codes: not worth a warning per row.
        with np.errstate(invalid="ignore", divide="ignore"):
            quantizer = MatMulNBitsQuantizer(model, algo_config=config)
            quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    result: onnx.ModelProto = quantizer.model.model
    return result


# ---------------------------------------------------------------- after the quantiser


def _restore_node_identity(graph: onnx.GraphProto, originals: dict[str, onnx.NodeProto]) -> None:
    """Give each node that replaced an original MatMul (found by the output it computes) the
    original's name and metadata."""
    for node in graph.node:
        if node.domain == _MS and node.op_type == "MatMulNBits":
            out = node.output[0]
            source = originals.get(out) or originals.get(out.removesuffix("_pre_reshape"))
            if source is not None:
                node.name = source.name
                del node.metadata_props[:]
                node.metadata_props.extend(source.metadata_props)


def _check_module_paths(before: ModulePaths, after: ModulePaths) -> None:
    lost = sorted(w.module for w in before.weights if w.module is not None and w.module not in after.by_module)
    if lost:
        raise ValueError(f"quantising lost the module paths of {lost}; PEFT adapters could not name them "
                         "(please report this model)")


# ---------------------------------------------------------------- small helpers


def _nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(numpy_helper.to_array(t).nbytes)


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(helper.get_attribute_value(a))
    return default


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def describe(rows: Sequence[QuantizedWeight]) -> dict[str, Any]:
    """Totals of :func:`quantization_of`: bytes and count per type."""
    totals: dict[str, dict[str, int]] = {}
    for r in rows:
        t = totals.setdefault(r.dtype, {"weights": 0, "bytes": 0})
        t["weights"] += 1
        t["bytes"] += r.bytes
    return totals
