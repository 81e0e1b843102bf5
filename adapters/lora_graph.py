"""LoRA graph surgery: the one place where lorad rewrites ONNX graphs.

One base graph is the source of truth. From it we derive

* the inference graph, in which each target weight ``W`` of a ``MatMul``/``Gemm`` gets a
  LoRA path ``x·W + (x·A)·B`` with ``A`` and ``B`` as session inputs (the engine folds the
  scale into ``B``), so one ORT session serves the base model and every adapter;
* the training graph (see the training section below), in which ``A`` and ``B`` are
  trainable initializers.

Targets are chosen with glob patterns over initializer names, as PEFT's
``target_modules`` chooses modules.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_compat import for_runtime

__all__ = [
    "LoraTarget",
    "find_targets",
    "fingerprint",
    "lora_input_names",
    "make_inference_graph",
]

_LINEAR_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class LoraTarget:
    """A base weight that gets a LoRA path; shapes in ``x·W`` orientation."""

    weight: str
    in_features: int
    out_features: int
    op: str
    transposed: bool = False  # Gemm with transB=1 stores W as [out, in]
    gemm_alpha: float = 1.0


def lora_input_names(weight: str) -> tuple[str, str]:
    """Names of the session inputs (inference) or initializers (training) of A and B."""
    return f"lora.{weight}.A", f"lora.{weight}.B"


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(graph: onnx.GraphProto, weight: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type in _LINEAR_OPS and len(n.input) > 1 and n.input[1] == weight]


def find_targets(model: onnx.ModelProto, patterns: Sequence[str]) -> list[LoraTarget]:
    """The 2-D float weights of MatMul/Gemm nodes whose names match any of ``patterns``.

    Every pattern must match at least one such weight, so a typo in a config file is
    reported instead of silently training or serving nothing.
    """
    if not patterns:
        raise ValueError("LoRA targets: give at least one glob pattern over weight names")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    linear_weights: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type in _LINEAR_OPS and len(node.input) > 1 and node.input[1] in inits:
            linear_weights.setdefault(node.input[1], []).append(node)

    targets: dict[str, LoraTarget] = {}
    for pattern in patterns:
        matched = [w for w in linear_weights if fnmatch.fnmatchcase(w, pattern)]
        if not matched:
            candidates = ", ".join(sorted(linear_weights)[:20]) or "(none)"
            raise ValueError(
                f"LoRA target pattern {pattern!r} matches no MatMul/Gemm weight; "
                f"weights that can be targets: {candidates}"
            )
        for weight in matched:
            targets[weight] = _describe_target(inits[weight], linear_weights[weight])
    return [targets[w] for w in sorted(targets)]


def _describe_target(init: onnx.TensorProto, nodes: list[onnx.NodeProto]) -> LoraTarget:
    if init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
        raise ValueError(
            f"LoRA target {init.name!r} must be a 2-D float32 weight, "
            f"got dims {list(init.dims)} of type {TensorProto.DataType.Name(init.data_type)}"
        )
    kinds = set()
    for node in nodes:
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                raise ValueError(f"LoRA target {init.name!r}: Gemm with transA=1 is not supported")
            kinds.add(("Gemm", bool(_attr(node, "transB", 0)), float(_attr(node, "alpha", 1.0))))
        else:
            kinds.add(("MatMul", False, 1.0))
    if len(kinds) != 1:
        raise ValueError(f"LoRA target {init.name!r} is used by linear nodes of different kinds: {sorted(kinds)}")
    op, transposed, alpha = kinds.pop()
    rows, cols = int(init.dims[0]), int(init.dims[1])
    in_f, out_f = (cols, rows) if transposed else (rows, cols)
    return LoraTarget(init.name, in_f, out_f, op, transposed, alpha)


def fingerprint(model: onnx.ModelProto, targets: Iterable[LoraTarget]) -> str:
    """Digest of the target weights (names, shapes and values) an adapter is made for."""
    inits = {i.name: i for i in model.graph.initializer}
    h = hashlib.sha256(b"lorad-fingerprint-v1\0")
    for t in sorted(targets, key=lambda t: t.weight):
        array = np.ascontiguousarray(numpy_helper.to_array(inits[t.weight]), dtype="<f4")
        h.update(f"{t.weight}\0{t.in_features}x{t.out_features}\0{int(t.transposed)}\0".encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def _insert_lora_paths(
    graph: onnx.GraphProto, targets: Sequence[LoraTarget], a_b_for: dict[str, tuple[str, str]]
) -> None:
    """Rewire every consumer of each target: its output becomes ``base + (x·A)·B``."""
    by_weight = {t.weight: t for t in targets}
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        new_nodes.append(node)
        if node.op_type not in _LINEAR_OPS or len(node.input) < 2 or node.input[1] not in by_weight:
            continue
        target = by_weight[node.input[1]]
        a_name, b_name = a_b_for[target.weight]
        prefix = f"lora/{index}/{target.weight}"
        out = node.output[0]
        base_out = f"{prefix}/base"
        node.output[0] = base_out
        x = node.input[0]
        new_nodes.append(helper.make_node("MatMul", [x, a_name], [f"{prefix}/xA"], name=f"{prefix}/xA"))
        delta = f"{prefix}/xAB"
        new_nodes.append(helper.make_node("MatMul", [f"{prefix}/xA", b_name], [delta], name=delta))
        if target.gemm_alpha != 1.0:
            alpha_name = f"{prefix}/gemm_alpha"
            graph.initializer.append(numpy_helper.from_array(np.array(target.gemm_alpha, np.float32), alpha_name))
            scaled = f"{prefix}/xAB_alpha"
            new_nodes.append(helper.make_node("Mul", [delta, alpha_name], [scaled], name=scaled))
            delta = scaled
        new_nodes.append(helper.make_node("Add", [base_out, delta], [out], name=f"{prefix}/add"))
    del graph.node[:]
    graph.node.extend(new_nodes)


def make_inference_graph(
    model: onnx.ModelProto, targets: Sequence[LoraTarget], *, rank: int | str
) -> onnx.ModelProto:
    """Derive the serving graph: A and B of every target become session inputs.

    ``rank`` is the slot rank (adapters of smaller rank are zero-padded by the engine)
    or a symbolic dimension name.
    """
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"slot rank must be a positive integer, got {rank}")
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    a_b_for = {t.weight: lora_input_names(t.weight) for t in targets}
    existing = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for t in targets:
        a_name, b_name = a_b_for[t.weight]
        if a_name in existing or b_name in existing:
            raise ValueError(f"model already has a tensor named {a_name!r} or {b_name!r}")
        graph.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [t.in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, t.out_features]))
    _insert_lora_paths(graph, targets, a_b_for)
    onnx.checker.check_model(derived)
    return for_runtime(derived)
