"""LoRA graph surgery: the one place where lorad rewrites ONNX graphs.

One base graph is the source of truth. From it we derive

* the inference graph, in which each target weight ``W`` of a ``MatMul``/``Gemm`` gets a
  LoRA path ``x·W + (x·A)·B`` with ``A`` and ``B`` as session inputs (the engine folds the
  scale into ``B``), so one ORT session serves the base model and every adapter;
* the training graph (see the training section below), in which ``A`` and ``B`` are
  trainable initializers.

Targets are chosen by module path, as PEFT's ``target_modules`` chooses modules, with the
paths :mod:`lorad.adapters.module_paths` recovers from the graph (or by ONNX weight name).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .lora import LoraWeights
from .module_paths import ModulePaths, linear_weight_resolver
from .onnx_compat import for_runtime

__all__ = [
    "LoraTarget",
    "digest_model",
    "find_targets",
    "fingerprint",
    "lora_input_names",
    "make_inference_graph",
    "make_training_graph",
    "splice_after_targets",
    "target_nodes",
    "tensor_ranks",
    "per_example_name",
]


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


def target_nodes(graph: onnx.GraphProto, targets: Sequence[LoraTarget]) -> list[tuple[int, onnx.NodeProto, LoraTarget]]:
    """Every linear node that multiplies by a target's weight: (index, node, target).

    The one place that decides which nodes get a LoRA path: a weight read directly, or
    through a Transpose (TorchScript's layout at opset 20), as the target search found it.
    Every derived graph (single, fused, banked, training) asks here, so a weight one of
    them finds cannot be missed by another.
    """
    by_weight = {t.weight: t for t in targets}
    resolve = linear_weight_resolver(graph)
    found = []
    for index, node in enumerate(graph.node):
        hit = resolve(node)
        if hit is not None and hit[0] in by_weight:
            found.append((index, node, by_weight[hit[0]]))
    return found


def find_targets(
    model: onnx.ModelProto, patterns: Sequence[str], *, paths: ModulePaths | None = None
) -> list[LoraTarget]:
    """The MatMul/Gemm weights ``patterns`` select (see :meth:`ModulePaths.select`).

    Patterns are PEFT-style module names (``q_proj``), globs over module paths, or globs
    over ONNX weight names; ``paths`` are the model's recovered module paths (recovered
    here when not given). Every pattern must match at least one weight, so a typo in a
    config file is reported instead of silently training or serving nothing.
    """
    chosen = (paths if paths is not None else ModulePaths.from_model(model)).select(patterns)
    targets = []
    for w in chosen:
        if w.unsupported:
            raise ValueError(f"LoRA target {w.weight!r} ({w.peft_name}): {w.unsupported}")
        targets.append(LoraTarget(w.weight, w.in_features, w.out_features, w.op, w.transposed, w.gemm_alpha))
    return sorted(targets, key=lambda t: t.weight)


def digest_model(model: onnx.ModelProto) -> str:
    """The identity of a whole model (SHA-256 of its deterministic serialisation); the
    engine computes it once per loaded model (:attr:`InferenceEngine.model_digest`)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def fingerprint(model: onnx.ModelProto, targets: Iterable[LoraTarget]) -> str:
    """Digest of the target weights (names, shapes and values) an adapter is made for."""
    targets = list(targets)
    inits = {i.name: i for i in model.graph.initializer}
    # A quantised weight (MatMulNBits' packed B) is its codes plus the node's scales and zero
    # points, and any tensor named after it as ONNX Runtime's quantiser names them
    # (``{w}.weight_Q4`` → ``{w}.weight_*``: the block offsets of an imported Q4_1 matrix):
    # hash the raw bytes of each.
    quantised: dict[str, list[str]] = {}
    for _, node, t in target_nodes(model.graph, targets):
        if inits[t.weight].data_type != TensorProto.FLOAT:
            stem = t.weight.rsplit("_", 1)[0] + "_"
            named = [n for n in node.input[1:] if n in inits]
            quantised[t.weight] = named + sorted(n for n in inits if n.startswith(stem) and n not in named)
    h = hashlib.sha256(b"lorad-fingerprint-v1\0")
    for t in sorted(targets, key=lambda t: t.weight):
        h.update(f"{t.weight}\0{t.in_features}x{t.out_features}\0{int(t.transposed)}\0".encode())
        if t.weight in quantised:
            h.update(f"{t.op}\0".encode())
            for name in quantised[t.weight]:
                h.update(f"{name}\0".encode() + numpy_helper.to_array(inits[name]).tobytes())
        else:
            h.update(np.ascontiguousarray(numpy_helper.to_array(inits[t.weight]), dtype="<f4").tobytes())
    return "sha256:" + h.hexdigest()


def splice_after_targets(
    graph: onnx.GraphProto,
    targets: Sequence[LoraTarget],
    lora_path: Callable[[onnx.NodeProto, LoraTarget, str], list[onnx.NodeProto]],
    *,
    head: Sequence[onnx.NodeProto] = (),
) -> None:
    """Insert ``lora_path(node, target, prefix)`` right after every node of
    :func:`target_nodes`, and ``head`` before all nodes.

    The derived graphs (single-request inference, banked inference, training) rewire the
    same nodes; only the path they add differs.
    """
    # By index: protobuf hands out a new wrapper object at every access to a node.
    paths = {index: t for index, _, t in target_nodes(graph, targets)}
    new_nodes: list[onnx.NodeProto] = list(head)
    for index, node in enumerate(graph.node):
        new_nodes.append(node)
        target = paths.get(index)
        if target is not None:
            new_nodes.extend(lora_path(node, target, f"lora/{index}/{target.weight}"))
    del graph.node[:]
    graph.node.extend(new_nodes)


def _inference_lora_path(graph: onnx.GraphProto, node: onnx.NodeProto, target: LoraTarget, prefix: str) -> list[onnx.NodeProto]:
    """Nodes making ``node``'s output ``base + (x·A)·B``, A and B being session inputs."""
    a_name, b_name = lora_input_names(target.weight)
    out = node.output[0]
    base_out = f"{prefix}/base"
    node.output[0] = base_out
    nodes = [
        helper.make_node("MatMul", [node.input[0], a_name], [f"{prefix}/xA"], name=f"{prefix}/xA"),
        helper.make_node("MatMul", [f"{prefix}/xA", b_name], [f"{prefix}/xAB"], name=f"{prefix}/xAB"),
    ]
    delta = f"{prefix}/xAB"
    if target.gemm_alpha != 1.0:
        alpha_name = f"{prefix}/gemm_alpha"
        graph.initializer.append(numpy_helper.from_array(np.array(target.gemm_alpha, np.float32), alpha_name))
        nodes.append(helper.make_node("Mul", [delta, alpha_name], [f"{prefix}/xAB_alpha"], name=f"{prefix}/xAB_alpha"))
        delta = f"{prefix}/xAB_alpha"
    nodes.append(helper.make_node("Add", [base_out, delta], [out], name=f"{prefix}/add"))
    return nodes


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
    existing = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for t in targets:
        a_name, b_name = lora_input_names(t.weight)
        if a_name in existing or b_name in existing:
            raise ValueError(f"model already has a tensor named {a_name!r} or {b_name!r}")
        graph.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [t.in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, t.out_features]))
    splice_after_targets(graph, targets, lambda node, t, prefix: _inference_lora_path(graph, node, t, prefix))
    onnx.checker.check_model(derived)
    return for_runtime(derived)


# --- Training graph ----------------------------------------------------------------------
#
# The training graph is the base graph with every target's LoRA path in it and A, B as
# initializers (ORT's artifact builder turns them into trainable parameters). For DP-SGD
# with true per-example clipping, chosen LoRA tensors are broadcast to one copy per
# example: ``Expand`` to ``[N, ...]`` with N read from the layer input's shape at run
# time, then batched MatMul. The gradient of each copy is then that example's gradient,
# and the trainer (trainer/artifacts.py) rewrites the reduction over the copies into
# clip-and-noise.


def per_example_name(name: str) -> str:
    """Name of the ``[N, ...]`` per-example broadcast of LoRA tensor ``name`` (training graph)."""
    return f"{name}.per_example"


def make_training_graph(
    model: onnx.ModelProto,
    targets: Sequence[LoraTarget],
    *,
    init: Mapping[str, LoraWeights],
    scale: float,
    per_example: Collection[str] = (),
    batch_input: str | None = None,
) -> onnx.ModelProto:
    """Derive the training graph: ``y = x·W + scale·(x·A)·B`` with A, B initializers.

    ``batch_input`` names a graph input whose first dimension is the batch N. With it, a
    per-example target's input ``x`` is viewed as ``[N, -1, in]`` whatever its rank, so
    targets behind a ``view(-1, in)`` (transformers' ``Conv1D``: ``x`` is ``[N·T, in]``)
    still get one copy per example rather than per row; rows must be example-major.

    ``init`` gives the initial A and B of every target (keyed by weight name); A and B are
    named :func:`lora_input_names`. ``per_example`` names the LoRA tensors (A and/or B
    names) that get a per-example broadcast :func:`per_example_name` feeding the
    products; the first dimension of such a target's input must be the batch. ``scale``
    is the LoRA scale (alpha/r); a Gemm target's ``alpha`` is applied on top of it.
    """
    if not targets:
        raise ValueError("the training graph needs at least one LoRA target")
    names = {n for t in targets for n in lora_input_names(t.weight)}
    unknown = set(per_example) - names
    if unknown:
        raise ValueError(f"per-example tensors {sorted(unknown)} are not A/B of the targets")
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    existing = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    ranks = tensor_ranks(model)
    for t in targets:
        if t.weight not in init:
            raise ValueError(f"no initial LoRA weights for target {t.weight!r}")
        w = init[t.weight]
        if w.A.shape[0] != t.in_features or w.B.shape[1] != t.out_features:
            raise ValueError(
                f"initial LoRA weights of {t.weight!r} have A {w.A.shape}, B {w.B.shape}; "
                f"the target needs A [{t.in_features}, r], B [r, {t.out_features}]"
            )
        for name, value in zip(lora_input_names(t.weight), (w.A, w.B), strict=True):
            if name in existing:
                raise ValueError(f"model already has a tensor named {name!r}")
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))

    uses = Counter(t.weight for _, _, t in target_nodes(graph, targets))
    for t in targets:
        if uses[t.weight] != 1 and set(lora_input_names(t.weight)) & set(per_example):
            raise ValueError(
                f"LoRA target {t.weight!r} is used by {uses[t.weight]} MatMul/Gemm nodes; per-example "
                "training graphs support targets used exactly once"
            )
    splice_after_targets(
        graph,
        targets,
        lambda node, t, prefix: _training_lora_path(
            graph, node, t, prefix, scale * t.gemm_alpha, per_example, ranks.get(node.input[0]), batch_input
        ),
    )
    onnx.checker.check_model(derived)
    return for_runtime(derived)


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose shape inference knows it."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _training_lora_path(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    target: LoraTarget,
    prefix: str,
    coefficient: float,
    per_example: Collection[str],
    x_rank: int | None,
    batch_input: str | None = None,
) -> list[onnx.NodeProto]:
    """Nodes computing ``out = base + coefficient·(x·A)·B`` after ``node`` (renamed to base)."""
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], suffix: str, **attrs: Any) -> str:
        out = f"{prefix}/{suffix}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(suffix: str, value: np.ndarray) -> str:
        name = f"{prefix}/{suffix}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    out = node.output[0]
    base_out = f"{prefix}/base"
    node.output[0] = base_out
    a_name, b_name = lora_input_names(target.weight)
    x = node.input[0]
    batched = [name for name in (a_name, b_name) if name in per_example]
    # Batched MatMul pairs example n of x with copy n only when x is [N, M, in].
    flatten = bool(batched) and (x_rank != 3 or batch_input is not None)
    if flatten and batch_input is not None:
        n = add("Shape", [batch_input], "batch", start=0, end=1)
        rows = const("rows_shape", np.array([-1, target.in_features], np.int64))
        x = add("Reshape", [x, add("Concat", [n, rows], "flat_shape", axis=0)], "x_flat")
    elif flatten:
        x = add("Reshape", [x, const("flat_shape", np.array([0, -1, target.in_features], np.int64))], "x_flat")
    if batched and batch_input is None:
        n = add("Shape", [x], "batch", start=0, end=1)
    factors: list[str] = []
    for name in (a_name, b_name):
        if name not in batched:
            factors.append(name)
            continue
        matrix = next(i for i in graph.initializer if i.name == name)
        dims = const(f"{name}.dims", np.array(matrix.dims, np.int64))
        shape = add("Concat", [n, dims], f"{name}.expand_shape", axis=0)
        expanded = per_example_name(name)
        nodes.append(helper.make_node("Expand", [name, shape], [expanded], name=expanded))
        factors.append(expanded)
    xa = add("MatMul", [x, factors[0]], "xA")
    delta = add("MatMul", [xa, factors[1]], "xAB")
    if flatten:
        delta = add("Reshape", [delta, add("Shape", [base_out], "base_shape")], "xAB_unflat")
    if coefficient != 1.0:
        delta = add("Mul", [delta, const("scale", np.array(coefficient, np.float32))], "xAB_scaled")
    nodes.append(helper.make_node("Add", [base_out, delta], [out], name=f"{prefix}/add"))
    return nodes
