"""The whole DP-SGD step as one ordinary ONNX graph (the portable training backend).

:func:`build_step_graphs` derives from the serving base graph a *step graph* that any
onnxruntime build runs in an ``InferenceSession`` on any execution provider, and a
small *eval graph* (forward and summed loss). The step graph does, in this order:

1. **unpack**: the trainable LoRA matrices arrive as ONE flat float32 vector
   (:data:`PARAMS_INPUT`, the order of ``trainable``) and are split into A and B;
2. **forward**: the base graph with ``y = x·W + s·(x·A)·B`` at every target; the base
   weights stay initializers, which ONNX Runtime constant-folds and pre-packs;
3. **loss**: summed cross-entropy (or squared error) and its gradient of the logits,
   written directly;
4. **backward**: lorad's reverse pass (:mod:`lorad.trainer.autodiff`) through the frozen graph,
   activation gradients only;
5. **per-example gradients**: for each target, with x, u = x·A and the output gradients
   g_y, g_u of example n, ``G_B[n] = u_nᵀ·g_y[n]`` and ``G_A[n] = x_nᵀ·g_u[n]`` as batched
   products (non-private graphs sum over the batch in one product instead); with the
   ``causal_lm`` loss the rows are token windows and :data:`EXAMPLE_INDEX_INPUT` says whose:
   a text's windows' gradients are summed into its one per-example gradient; ``G_A[n]`` is
   computed (and its row stored) transposed, ``g_u[n]ᵀ·x_n``, the faster product
   (:func:`transposed_rows`), and its clipped sum is put back in A's order;
6. **clip**: ``factor[n] = min(1, C / (‖G[n]‖ + 1e-6))`` over all LoRA parameters of
   example n; an example whose gradient is not finite gets factor 0 and its gradient is
   replaced by zeros before the sum, so it counts as a zero contribution;
7. **accumulate** ``Σ_n factor[n]·G[n]`` (out as :data:`PART_SUM_OUTPUT`), add the float64
   :data:`CARRIED_SUM_INPUT` (the sum of the step's earlier parts, zero for a step taken
   whole), **add noise** (the float64 input :data:`NOISE_INPUT`, drawn on the host, added
   to the widened sum, rounded once) and **scale** by :data:`GRAD_SCALE_INPUT`;
8. **update**: SGD, or AdamW with its moments as inputs and outputs, exactly as ONNX
   Runtime's training optimizer computes them.

An op on the gradient path without a rule makes :func:`build_step_graphs` raise
:class:`lorad.trainer.autodiff.UnsupportedNodeError` naming it.

:func:`with_canary_rows` derives from a built private step graph the privacy audit's
variant (trainer/audit.py): extra per-example gradient rows join the examples' rows
before step 6, so the very nodes that clip the examples clip them, and the examples' own
clipped sum comes out as well. Training never runs that variant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lorad.adapters.lora import LoraWeights
from lorad.adapters.lora_graph import LoraTarget, lora_input_names, make_training_graph
from lorad.adapters.onnx_compat import for_runtime

from ._graph_prune import drop_unused
from .autodiff import Emitter, backward, graph_constants, infer_tensor_infos

__all__ = [
    "PARAMS_INPUT", "LEARNING_RATE_INPUT", "STEP_INPUT", "MOMENT1_INPUT", "MOMENT2_INPUT",
    "PARAMS_OUTPUT", "MOMENT1_OUTPUT", "MOMENT2_OUTPUT", "LOSS_OUTPUT", "GRAD_OUTPUT",
    "ADAMW_BETAS", "ADAMW_EPSILON", "PER_EXAMPLE", "PerExample", "StepGraphs", "build_step_graphs",
    "per_example_flat", "IGNORED_LABEL", "CANARY_ROWS_INPUT", "EXAMPLE_WEIGHT_INPUT", "EXAMPLES_SUM_OUTPUT", "with_canary_rows",
    "EXAMPLE_INDEX_INPUT", "CARRIED_SUM_INPUT", "PART_SUM_OUTPUT", "TRANSPOSED_ROWS_KEY", "transposed_rows",
]

PARAMS_INPUT = "train.params"
LEARNING_RATE_INPUT = "train.learning_rate"
STEP_INPUT = "train.step"  # 1-based index of the step being taken (AdamW's bias correction)
MOMENT1_INPUT = "train.moment1"
MOMENT2_INPUT = "train.moment2"
PARAMS_OUTPUT = "train.params.updated"
MOMENT1_OUTPUT = "train.moment1.updated"
MOMENT2_OUTPUT = "train.moment2.updated"
LOSS_OUTPUT = "train.loss_sum"
GRAD_OUTPUT = "train.gradient"  # what the optimizer consumed: clipped, noised, scaled
# A step taken in parts (trainer/portable.py): the float64 sum of the earlier parts' clipped
# gradients joins this part's before the noise, and each part's own sum (clipped, not noised
# or scaled; plain for a non-private graph) comes out.
CARRIED_SUM_INPUT = "train.carried_sum"
PART_SUM_OUTPUT = "train.part_sum"
# causal_lm: the example each window row belongs to (int64 [rows], 0-based, rows of an
# example consecutive): an example is a whole text, clipped as one (trainer/lm_examples.py).
EXAMPLE_INDEX_INPUT = "example_index"
# The audit variant's (with_canary_rows): extra rows [M, P] of per-example gradients, laid
# out as the flat parameter vector; a weight on the batch's own rows (1, or 0 to cancel an
# empty batch's placeholder example while the extra rows still count); the clipped sum of
# the batch's own rows alone.
CANARY_ROWS_INPUT = "audit.canary_rows"
EXAMPLE_WEIGHT_INPUT = "audit.example_weight"
EXAMPLES_SUM_OUTPUT = "audit.examples_clipped_sum"
#: Metadata key of the step graph: JSON {name: [rows, cols]} of the LoRA tensors whose
#: per-example rows hold the transposed gradient (:func:`transposed_rows`).
TRANSPOSED_ROWS_KEY = "lorad.per_example_transposed"

# ONNX Runtime's onnxblock.optim.AdamW defaults, which the ort-training backend uses.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPSILON = 1e-6
_CLIP_EPSILON = 1e-6  # as Opacus and the ort-training graph: C/norm stays finite at norm 0
_MIN_OPSET = 13  # axes as inputs (ReduceSum, Unsqueeze, Split)

#: ``causal_lm``: next-token cross-entropy of a decoder's logits ``[N, T, vocab]`` against
#: labels ``[N, T]`` (the next token at each position, -100 where nothing counts: padding,
#: the last position), summed over the counted positions of each example.
Loss = Literal["cross_entropy", "mse", "causal_lm"]
IGNORED_LABEL = -100
Optimizer = Literal["adamw", "sgd"]
#: How per-example norms are found: by materialising each example's LoRA gradients, or
#: by ghost norms (‖x_nᵀ·g_n‖² from the Gram matrices x_n·x_nᵀ and g_n·g_nᵀ, the clipped
#: sum then one product over all tokens with the factors folded into g).
#: Measured on the reference encoder (sequence 16, rank 8, in one process, interleaved):
#: 1118 vs 1164 ms at batch 16, 4944 vs 4905 ms at batch 64 (a heavily shared machine):
#: no gain from ghost norms at these sizes, so the simpler materialised form is used.
#: Ghost norms cost N·M²·(in + out) and win when the sequence M is short against r.
PerExample = Literal["materialize", "ghost"]
PER_EXAMPLE: PerExample = "materialize"


@dataclass(frozen=True)
class StepGraphs:
    step: onnx.ModelProto
    eval: onnx.ModelProto
    #: The base model's data inputs (the label input comes last in the step graph).
    model_inputs: tuple[str, ...]


def build_step_graphs(
    model: onnx.ModelProto,
    targets: Sequence[LoraTarget],
    *,
    init: dict[str, LoraWeights],
    scale: float,
    trainable: Sequence[tuple[str, tuple[int, ...]]],
    output: str,
    loss: Loss,
    label_input: str,
    private: bool,
    optimizer: Optimizer,
    weight_decay: float,
    reserved_inputs: Sequence[str],
    clip_norm_input: str,
    noise_input: str,
    grad_scale_input: str,
    per_example: PerExample | None = None,
) -> StepGraphs:
    """See the module docstring. ``trainable`` lists the LoRA tensors in the flat vector's
    order; LoRA tensors not in it (A in frozen-A mode) stay constants of ``init``."""
    if model.opset_import and _default_opset(model) < _MIN_OPSET:
        model = onnx.version_converter.convert_version(model, _MIN_OPSET)
    forward = make_training_graph(model, targets, init=init, scale=scale)
    graph = forward.graph
    trainable_names = [name for name, _ in trainable]
    # The trainable matrices become graph inputs (fed from the flat vector below).
    kept = [i for i in graph.initializer if i.name not in set(trainable_names)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, shape in trainable:
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    outputs = [o.name for o in graph.output]
    if output not in outputs:
        raise ValueError(f"ArtifactConfig.output {output!r} is not a model output; outputs: {outputs}")
    initializers = {i.name for i in graph.initializer}
    model_inputs = tuple(i.name for i in graph.input if i.name not in initializers and i.name not in trainable_names)
    collide = set(reserved_inputs) & set(model_inputs)
    if collide:
        raise ValueError(f"the base model's inputs {list(model_inputs)} collide with the trainer's {sorted(collide)}")

    infos = infer_tensor_infos(forward)
    opset = _default_opset(forward)
    e = Emitter("train", opset, infos, graph_constants(graph))
    z = output
    z_info = infos.get(z)
    if z_info is None or z_info.elem_type != TensorProto.FLOAT or z_info.rank is None:
        raise ValueError(f"the loss output {z!r} must be float32 of known rank; shape inference found {z_info}")

    # 1. unpack the flat parameter vector
    sizes = [int(np.prod(shape)) for _, shape in trainable]
    total = sum(sizes)
    unpack: list[onnx.NodeProto] = []
    pieces = [f"train/unpack/{name}" for name in trainable_names]
    unpack.append(helper.make_node("Split", [PARAMS_INPUT, e.ints(sizes)], pieces, name="train/unpack", axis=0))
    for (name, shape), piece in zip(trainable, pieces, strict=True):
        unpack.append(helper.make_node("Reshape", [piece, e.ints(shape)], [name], name=f"train/unpack/{name}/shape"))

    # 3. loss and its gradient of the output
    label_vi, g_z = _loss(e, z, z_info.rank, loss, label_input)
    loss_nodes = list(e.nodes)
    del e.nodes[:]

    # 4. backward through the frozen graph
    grads = backward(graph, e, {z: g_z}, trainable_names)

    # 5.-7. per-example gradients, clip, accumulate, noise, scale
    examples = [_per_target_factors(graph, t, grads, trainable_names) for t in targets]
    windows = loss == "causal_lm"
    if private:
        ghost = (per_example or PER_EXAMPLE) == "ghost"
        if ghost and windows:
            raise ValueError("ghost norms take one row per example; causal_lm examples are groups of windows")
        group = _window_membership(e) if windows else None
        part, transposed = _private_gradient(e, examples, trainable_names, clip_norm_input, ghost=ghost, group=group)
        gradient = _noise_and_scale(e, part, noise_input, grad_scale_input)
    else:
        transposed = {}
        part = _summed_gradient(e, examples, trainable_names)
        gradient = _noise_and_scale(e, part, None, grad_scale_input)
    e.nodes.append(helper.make_node("Identity", [gradient], [GRAD_OUTPUT], name="train/gradient"))

    # 8. update
    update_outputs = _update(e, optimizer, weight_decay)

    rows = label_vi.type.tensor_type.shape.dim[0].dim_param or "N"
    index_vi = [helper.make_tensor_value_info(EXAMPLE_INDEX_INPUT, TensorProto.INT64, [rows])] if windows else []
    inputs = [*[i for i in graph.input if i.name in model_inputs], *index_vi, label_vi,
              helper.make_tensor_value_info(PARAMS_INPUT, TensorProto.FLOAT, [total]),
              helper.make_tensor_value_info(grad_scale_input, TensorProto.FLOAT, []),
              helper.make_tensor_value_info(LEARNING_RATE_INPUT, TensorProto.FLOAT, []),
              helper.make_tensor_value_info(CARRIED_SUM_INPUT, TensorProto.DOUBLE, [total])]
    if private:
        inputs += [helper.make_tensor_value_info(clip_norm_input, TensorProto.FLOAT, []),
                   helper.make_tensor_value_info(noise_input, TensorProto.DOUBLE, [total])]
    if optimizer == "adamw":
        inputs += [helper.make_tensor_value_info(STEP_INPUT, TensorProto.FLOAT, []),
                   helper.make_tensor_value_info(MOMENT1_INPUT, TensorProto.FLOAT, [total]),
                   helper.make_tensor_value_info(MOMENT2_INPUT, TensorProto.FLOAT, [total])]
    outs = [helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, []),
            helper.make_tensor_value_info(GRAD_OUTPUT, TensorProto.FLOAT, [total]),
            helper.make_tensor_value_info(PART_SUM_OUTPUT, TensorProto.FLOAT, [total]),
            *[helper.make_tensor_value_info(name, TensorProto.FLOAT, [total]) for name in update_outputs]]
    step_graph = helper.make_graph(
        [*unpack, *graph.node, *loss_nodes, *e.nodes], f"{graph.name or 'model'}_lorad_step", inputs, outs,
        initializer=[*graph.initializer, *e.initializers],
    )
    eval_inputs = [*[i for i in graph.input if i.name in model_inputs], *index_vi, label_vi,
                   helper.make_tensor_value_info(PARAMS_INPUT, TensorProto.FLOAT, [total])]
    eval_graph = helper.make_graph(
        [*unpack, *graph.node, *loss_nodes], f"{graph.name or 'model'}_lorad_eval", eval_inputs,
        [helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, [])],
        initializer=[*graph.initializer, *e.initializers],
    )
    step_model = _model_like(forward, step_graph)
    if transposed:
        step_model.metadata_props.add(key=TRANSPOSED_ROWS_KEY, value=json.dumps({k: list(v) for k, v in transposed.items()}))
    return StepGraphs(step_model, _prune(_model_like(forward, eval_graph)), model_inputs)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _model_like(template: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=list(template.opset_import), producer_name="lorad.portable")
    model.ir_version = template.ir_version
    return for_runtime(model)


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers nothing uses (the eval graph shares the step's constants)."""
    drop_unused(model.graph)
    return model


def _loss(e: Emitter, z: str, rank: int, loss: Loss, label_input: str) -> tuple[onnx.ValueInfoProto, str]:
    """Summed loss and dL/dz. Cross-entropy: Σ_n -log softmax(z_n)[y_n], dL/dz = softmax - onehot;
    causal_lm the same at every counted position of every example."""
    if loss == "cross_entropy":
        if rank != 2:
            raise ValueError(f"cross_entropy needs logits [N, classes]; the output {z!r} has rank {rank}")
        batch = (e.dims(z) or ("N",))[0]
        label = helper.make_tensor_value_info(label_input, TensorProto.INT64, [batch if batch is not None else "N"])
        log_p = e.op("LogSoftmax", [z], "log_probs", axis=1)
        picked = e.op("GatherElements", [log_p, e.unsqueeze(label_input, [1])], "picked", axis=1)
        loss_sum = e.op("Neg", [e.reduce("ReduceSum", picked, None, keepdims=False)])
        depth = e.op("Gather", [e.shape(z), e.ints([1])], axis=0)
        onehot = e.op("OneHot", [label_input, depth, e.const(np.asarray([0.0, 1.0], np.float32))], "onehot", axis=-1)
        g_z = e.op("Sub", [e.op("Exp", [log_p]), onehot], "loss_grad")
    elif loss == "causal_lm":
        if rank != 3:
            raise ValueError(f"causal_lm needs logits [N, T, vocab]; the output {z!r} has rank {rank}")
        dims = e.dims(z) or ("N", "T", None)
        label = helper.make_tensor_value_info(label_input, TensorProto.INT64,
                                              [d if d is not None else k for d, k in zip(dims[:2], ("N", "T"), strict=True)])
        counted = e.op("Not", [e.op("Equal", [label_input, e.const(np.asarray(IGNORED_LABEL, np.int64))])], "counted")
        safe = e.op("Where", [counted, label_input, e.const(np.asarray(0, np.int64))], "safe_labels")
        weight = e.unsqueeze(e.op("Cast", [counted], to=TensorProto.FLOAT), [2])  # [N, T, 1]
        log_p = e.op("LogSoftmax", [z], "log_probs", axis=2)
        picked = e.op("GatherElements", [log_p, e.unsqueeze(safe, [2])], "picked", axis=2)
        loss_sum = e.op("Neg", [e.reduce("ReduceSum", e.op("Mul", [picked, weight]), None, keepdims=False)])
        # (softmax - onehot)·counted, the one-hot part scattered in: no [N, T, vocab] one-hot
        # tensor (at a 49,152-token vocabulary it is 200 MB for 16 windows of 64 tokens).
        g_z = e.op("ScatterElements", [e.op("Mul", [e.op("Exp", [log_p]), weight]), e.unsqueeze(safe, [2]),
                                       e.op("Neg", [weight])], "loss_grad", axis=2, reduction="add")
    else:
        label = helper.make_tensor_value_info(label_input, TensorProto.FLOAT, list(e.dims(z) or []))
        diff = e.op("Sub", [z, label_input], "residual")
        loss_sum = e.reduce("ReduceSum", e.op("Mul", [diff, diff]), None, keepdims=False)
        g_z = e.op("Mul", [diff, e.const(np.asarray(2.0, np.float32))], "loss_grad")
    e.nodes.append(helper.make_node("Identity", [loss_sum], [LOSS_OUTPUT], name="train/loss"))
    return label, g_z


@dataclass(frozen=True)
class _TargetFactors:
    """What the per-example gradients of one target are made of: ``G_A[n] = x_nᵀ·g_u[n]``
    and ``G_B[n] = u_nᵀ·g_y[n]`` (``g_y`` already carries the LoRA scale)."""

    target: LoraTarget
    x: str
    u: str
    g_u: str
    g_y: str
    rank: int


def _per_target_factors(graph: onnx.GraphProto, t: LoraTarget, grads: dict[str, str],
                        trainable: Sequence[str]) -> _TargetFactors:
    a_name, b_name = lora_input_names(t.weight)
    xa = next(n for n in graph.node if n.op_type == "MatMul" and list(n.input)[1:] == [a_name])
    xab = next(n for n in graph.node if n.op_type == "MatMul" and list(n.input)[1:] == [b_name])
    u, y = xa.output[0], xab.output[0]
    if y not in grads or (a_name in trainable and u not in grads):
        raise ValueError(f"LoRA target {t.weight!r} does not influence the loss output; drop it from the targets")
    return _TargetFactors(t, xa.input[0], u, grads.get(u, ""), grads[y], _input_rank(graph, b_name))


def _input_rank(graph: onnx.GraphProto, b_name: str) -> int:
    """The LoRA rank r: B is [r, out], a graph input of the forward graph here."""
    vi = next(i for i in graph.input if i.name == b_name)
    return int(vi.type.tensor_type.shape.dim[0].dim_value)


def _window_membership(e: Emitter) -> str:
    """``[examples, rows]`` float32, 1 where the row is a window of the example: from
    :data:`EXAMPLE_INDEX_INPUT`, so that an example's gradient is the sum of its windows'."""
    count = e.op("Add", [e.op("ReduceMax", [EXAMPLE_INDEX_INPUT], keepdims=1), e.const(np.asarray([1], np.int64))])
    examples = e.op("Range", [e.const(np.asarray(0, np.int64)), e.op("Squeeze", [count, e.ints([0])]),
                              e.const(np.asarray(1, np.int64))])
    member = e.op("Equal", [e.unsqueeze(examples, [1]), e.unsqueeze(EXAMPLE_INDEX_INPUT, [0])])
    return e.op("Cast", [member], "example_windows", to=TensorProto.FLOAT)


def _example_blocks(e: Emitter, f: _TargetFactors, trainable: Sequence[str],
                    group: str | None = None) -> list[tuple[str, str, int, tuple[int, int] | None]]:
    """(name, [N, numel] per-example gradient, numel, transposed) for the target's trainable
    tensors; with ``group`` (:func:`_window_membership`) the rows are windows, summed into
    their examples. ``transposed`` is ``(r, in)`` where the rows hold ``G_Aᵀ[n]`` (see
    :data:`TRANSPOSED_ROWS_KEY`), None where they are in the parameter's own order."""
    t = f.target
    a_name, b_name = lora_input_names(t.weight)
    rank = e.dims(f.u)[-1]  # type: ignore[index]
    assert isinstance(rank, int)

    def rows(name: str, width: int) -> str:  # [N, tokens, width] whatever the layer's rank
        return e.op("Reshape", [name, e.ints([0, -1, width])])

    def flat(name: str, product: str, numel: int) -> str:
        if group is None:
            return _named(e, "Reshape", [product, e.ints([0, numel])], per_example_flat(name))
        per_window = e.op("Reshape", [product, e.ints([0, numel])], f"{name}/per_window")
        return _named(e, "MatMul", [group, per_window], per_example_flat(name))

    out: list[tuple[str, str, int, tuple[int, int] | None]] = []
    if a_name in trainable:
        # G_Aᵀ[n] = g_u[n]ᵀ·x_n, [r, in]: the rank-r side as the product's rows. MLAS runs
        # it 3-4x faster than x_nᵀ·g_u[n] ([in, r], an r-wide output): on MiniLM at 64
        # tokens 0.15 against 0.6 ms per target. Norms do not care about the order; the
        # clipped sum is put back in A's order once, after the sum over the batch.
        ga = e.op("MatMul", [e.op("Transpose", [rows(f.g_u, rank)], perm=[0, 2, 1]), rows(f.x, t.in_features)],
                  f"{a_name}/per_example")
        out.append((a_name, flat(a_name, ga, t.in_features * rank), t.in_features * rank, (rank, t.in_features)))
    gb = e.op("MatMul", [e.op("Transpose", [rows(f.u, rank)], perm=[0, 2, 1]), rows(f.g_y, t.out_features)],
              f"{b_name}/per_example")
    out.append((b_name, flat(b_name, gb, rank * t.out_features), rank * t.out_features, None))
    return out


def per_example_flat(name: str) -> str:
    """The step graph's ``[N, numel]`` per-example gradients of LoRA tensor ``name``
    (where clip-and-noise starts: the benchmark cuts the graph there). The rows of the
    tensors :func:`transposed_rows` names hold each example's gradient transposed."""
    return f"train/{name}/per_example_gradient"


def transposed_rows(step: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """LoRA tensors whose per-example rows (:func:`per_example_flat`) hold ``Gᵀ`` flattened:
    name → ``(rows, cols)`` of that transposed matrix (``(r, in)`` for an A). Read from the
    step graph's :data:`TRANSPOSED_ROWS_KEY`; none in a graph without it."""
    for prop in step.metadata_props:
        if prop.key == TRANSPOSED_ROWS_KEY:
            return {name: (int(r), int(c)) for name, (r, c) in json.loads(prop.value).items()}
    return {}


def with_canary_rows(step: onnx.ModelProto, trainable: Sequence[tuple[str, tuple[int, ...]]]) -> onnx.ModelProto:
    """The privacy audit's variant of a private step graph (a copy; ``step`` is unchanged).

    The rows of :data:`CANARY_ROWS_INPUT` ([M, P], P the flat parameter vector's length,
    M >= 0) are appended, block by block, to the examples' per-example gradients where
    :func:`per_example_flat` names them, i.e. before the per-example norms: from there on
    the graph is the training graph's own, so they are clipped to C by the same nodes,
    summed with the examples and noised with them. The examples' rows are first multiplied
    by :data:`EXAMPLE_WEIGHT_INPUT`. :data:`EXAMPLES_SUM_OUTPUT` is the examples' share of
    the clipped sum (their clip factors from the same nodes). Needs materialised
    per-example gradients (``PER_EXAMPLE = "materialize"``)."""
    model = onnx.ModelProto()
    model.CopyFrom(step)
    graph = model.graph
    if _default_opset(model) < _MIN_OPSET:  # build_step_graphs converts to it at least
        raise ValueError(f"the step graph has opset {_default_opset(model)}, expected at least {_MIN_OPSET}")
    names = [name for name, _ in trainable]
    sizes = [int(np.prod(shape)) for _, shape in trainable]
    producers = {out: node for node in graph.node for out in node.output}
    missing = [name for name in names if per_example_flat(name) not in producers]
    if missing:
        raise ValueError(f"the step graph has no per-example gradients of {missing} (ghost norms, or not a private "
                         "step graph); the audit needs materialised ones")
    factor_nodes = [n for n in graph.node if n.op_type == "Where" and n.output[0].startswith("train/clip_factor_finite")]
    if len(factor_nodes) != 1:
        raise ValueError(f"the step graph has {len(factor_nodes)} clip factor nodes, expected 1")
    finite, factor = factor_nodes[0].input[0], factor_nodes[0].output[0]
    existing = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    if {CANARY_ROWS_INPUT, EXAMPLE_WEIGHT_INPUT} & existing:
        raise ValueError("the step graph already has the audit's inputs")

    constants: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(value, f"audit/{name}"))
        return f"audit/{name}"

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=out, **attrs)

    transposed = transposed_rows(step)
    split = [f"audit/canary_rows/{name}" for name in names]
    head = [helper.make_node("Split", [CANARY_ROWS_INPUT, const("sizes", np.asarray(sizes, np.int64))], split,
                             name="audit/canary_rows", axis=1)]
    pieces = []
    for name, piece in zip(names, split, strict=True):
        if name in transposed:  # canary rows come in the parameter's order; these rows hold Gᵀ
            r, c = transposed[name]
            head += [node("Reshape", [piece, const(f"{name}/as_param", np.asarray([0, c, r], np.int64))],
                          f"{piece}/as_param"),
                     node("Transpose", [f"{piece}/as_param"], f"{piece}/t", perm=[0, 2, 1]),
                     node("Reshape", [f"{piece}/t", const(f"{name}/rows", np.asarray([0, r * c], np.int64))],
                          f"{piece}/transposed")]
            piece = f"{piece}/transposed"
        pieces.append(piece)
    after: dict[str, list[onnx.NodeProto]] = {}
    weighted: dict[str, str] = {}
    for name, piece in zip(names, pieces, strict=True):
        flat = per_example_flat(name)
        producer = producers[flat]
        own = f"{flat}/examples"
        producer.output[list(producer.output).index(flat)] = own
        weighted[name] = f"{own}/weighted"
        after[own] = [node("Mul", [own, EXAMPLE_WEIGHT_INPUT], weighted[name]),
                      helper.make_node("Concat", [weighted[name], piece], [flat], name=f"audit/{flat}", axis=0)]
    zero = const("zero", np.asarray(0.0, np.float32))
    axis0 = const("axis0", np.asarray([0], np.int64))
    axis1 = const("axis1", np.asarray([1], np.int64))
    tail = [node("Shape", [weighted[names[0]]], "audit/examples/shape"),
            node("Gather", ["audit/examples/shape", axis0], "audit/examples/count", axis=0),
            node("Slice", [factor, axis0, "audit/examples/count", axis0], "audit/examples/clip_factor"),
            node("Slice", [finite, axis0, "audit/examples/count", axis0], "audit/examples/finite"),
            node("Unsqueeze", ["audit/examples/clip_factor", axis0], "audit/examples/clip_row"),
            node("Unsqueeze", ["audit/examples/finite", axis1], "audit/examples/finite_col")]
    sums = []
    for name in names:
        rows = f"audit/examples/{name}/finite_rows"
        sums.append(f"audit/examples/{name}/clipped_sum")
        tail += [node("Where", ["audit/examples/finite_col", weighted[name], zero], rows),
                 node("MatMul", ["audit/examples/clip_row", rows], sums[-1])]
        if name in transposed:
            r, c = transposed[name]
            summed = sums.pop()
            tail += [node("Reshape", [summed, const(f"{name}/as_t", np.asarray([r, c], np.int64))], f"{summed}/as_t"),
                     node("Transpose", [f"{summed}/as_t"], f"{summed}/t", perm=[1, 0]),
                     node("Reshape", [f"{summed}/t", const(f"{name}/row", np.asarray([1, r * c], np.int64))],
                          f"{summed}/param_order")]
            sums.append(f"{summed}/param_order")
    tail += [node("Concat", sums, "audit/examples/clipped_sum_row", axis=1),
             node("Reshape", ["audit/examples/clipped_sum_row", const("flat", np.asarray([-1], np.int64))],
                  EXAMPLES_SUM_OUTPUT)]
    nodes: list[onnx.NodeProto] = [*head]
    for n in graph.node:
        nodes.append(n)
        for out in n.output:
            nodes.extend(after.get(out, []))
    del graph.node[:]
    graph.node.extend([*nodes, *tail])
    graph.initializer.extend(constants)
    total = sum(sizes)
    graph.input.extend([helper.make_tensor_value_info(CANARY_ROWS_INPUT, TensorProto.FLOAT, ["canaries", total]),
                        helper.make_tensor_value_info(EXAMPLE_WEIGHT_INPUT, TensorProto.FLOAT, [])])
    graph.output.append(helper.make_tensor_value_info(EXAMPLES_SUM_OUTPUT, TensorProto.FLOAT, [total]))
    return model


def _named(e: Emitter, op: str, inputs: list[str], out: str) -> str:
    e.nodes.append(helper.make_node(op, inputs, [out], name=out))
    return out


def _ordered(blocks: dict[str, str], trainable: Sequence[str]) -> list[str]:
    return [blocks[name] for name in trainable]


def _private_gradient(e: Emitter, factors: Sequence[_TargetFactors], trainable: Sequence[str],
                      clip_norm: str, *, ghost: bool, group: str | None) -> tuple[str, dict[str, tuple[int, int]]]:
    """Σ_n min(1, C/‖G[n]‖)·G[n], float32 [P], and the tensors whose per-example rows are
    transposed (:func:`transposed_rows`)."""
    blocks: dict[str, str] = {}
    transposed: dict[str, tuple[int, int]] = {}
    squares = []
    total = 0
    if ghost:
        squares = _ghost_squares(e, factors, trainable)
        total = sum(_numel(f, name) for f in factors for name in _names(f, trainable))
    else:
        for f in factors:
            for name, flat, numel, t_shape in _example_blocks(e, f, trainable, group):
                blocks[name] = flat
                if t_shape is not None:
                    transposed[name] = t_shape
                total += numel
                squares.append(e.op("ReduceSumSquare", [flat], f"{name}/sq_norm", axes=[1], keepdims=0)
                               if e.opset < 18 else
                               e.op("ReduceSumSquare", [flat, e.ints([1])], f"{name}/sq_norm", keepdims=0))
    sq = e.op("Sum", squares, "sq_norm") if len(squares) > 1 else squares[0]
    norm = e.op("Sqrt", [sq], "norm")
    ratio = e.op("Div", [clip_norm, e.op("Add", [norm, e.const(np.asarray(_CLIP_EPSILON, np.float32))])])
    factor = e.op("Min", [ratio, e.const(np.asarray(1.0, np.float32))], "clip_factor")
    # A non-finite norm means a non-finite (or overflowing) gradient: count it as zero.
    finite = e.op("Not", [e.op("Or", [e.op("IsNaN", [sq]), e.op("IsInf", [sq])])], "finite")
    zero = e.const(np.asarray(0.0, np.float32))
    factor = e.op("Where", [finite, factor, zero], "clip_factor_finite")
    row = e.unsqueeze(factor, [0])
    # Only a batch with a non-finite example pays for zeroing rows (0·inf would be NaN in
    # the sum): an If picks the plain products when every example is finite.
    finite_col = e.unsqueeze(finite, [1])
    names = [name for name in trainable if name in blocks] if not ghost else []

    def branch(sanitise: bool) -> onnx.GraphProto:
        first = len(e.nodes)
        if ghost:
            sums = _ghost_sums(e, factors, trainable, factor, finite, sanitise=sanitise)
        else:
            sums = []
            for name in names:
                flat = blocks[name]
                rows = e.op("Where", [finite_col, flat, zero], "finite_rows") if sanitise else flat
                summed = e.op("MatMul", [row, rows], "clipped_sum")
                if name in transposed:  # Gᵀ's order → the parameter's, once per step
                    r, c = transposed[name]
                    as_t = e.op("Reshape", [summed, e.ints([r, c])])
                    summed = e.op("Reshape", [e.op("Transpose", [as_t], perm=[1, 0]), e.ints([1, r * c])],
                                  "clipped_sum")
                sums.append(summed)
        joined = e.op("Concat", sums, axis=1) if len(sums) > 1 else sums[0]
        nodes = e.nodes[first:]
        del e.nodes[first:]
        return helper.make_graph(nodes, e.fresh("branch").replace("/", "_"), [],
                                 [helper.make_tensor_value_info(joined, TensorProto.FLOAT, [1, total])])

    bad = e.op("Greater", [e.reduce("ReduceSum", e.op("Cast", [e.op("Not", [finite])], to=TensorProto.FLOAT), None,
                                    keepdims=False), zero], "any_non_finite")
    joined = e.op("If", [bad], "clipped_sum_row", then_branch=branch(True), else_branch=branch(False))
    return e.op("Reshape", [joined, e.ints([-1])], "clipped_sum"), transposed


def _noise_and_scale(e: Emitter, part: str, noise: str | None, grad_scale: str) -> str:
    """This part's sum out as :data:`PART_SUM_OUTPUT`; the carried sum of earlier parts and
    the noise added to it widened, rounded once (see trainer/noise.py), then scaled."""
    e.nodes.append(helper.make_node("Identity", [part], [PART_SUM_OUTPUT], name="train/part_sum"))
    total = e.op("Add", [e.op("Cast", [part], to=TensorProto.DOUBLE), CARRIED_SUM_INPUT], "carried")
    if noise is not None:
        total = e.op("Add", [total, noise], "noised")
    return e.op("Mul", [e.op("Cast", [total], to=TensorProto.FLOAT), grad_scale], "scaled_gradient")


def _names(f: _TargetFactors, trainable: Sequence[str]) -> list[str]:
    return [name for name in lora_input_names(f.target.weight) if name in trainable]


def _numel(f: _TargetFactors, name: str) -> int:
    t = f.target
    width = t.in_features if name.endswith(".A") else t.out_features
    return width * int(f.rank)


def _ghost_squares(e: Emitter, factors: Sequence[_TargetFactors], trainable: Sequence[str]) -> list[str]:
    """‖x_nᵀ·g_n‖² = Σ_ij (x_n·x_nᵀ)_ij (g_n·g_nᵀ)_ij; the Gram matrix of a layer input is
    shared by every target that reads it (q, k and v)."""
    grams: dict[str, str] = {}

    def gram(name: str, width: int) -> str:
        if name not in grams:
            rows = e.op("Reshape", [name, e.ints([0, -1, width])])
            grams[name] = e.op("MatMul", [rows, e.op("Transpose", [rows], perm=[0, 2, 1])], "gram")
        return grams[name]

    squares = []
    for f in factors:
        t, rank = f.target, f.rank
        a_name, _b_name = lora_input_names(t.weight)
        if a_name in trainable:
            product = e.op("Mul", [gram(f.x, t.in_features), gram(f.g_u, rank)])
            squares.append(e.reduce("ReduceSum", product, [1, 2], keepdims=False))
        product = e.op("Mul", [gram(f.u, rank), gram(f.g_y, t.out_features)])
        squares.append(e.reduce("ReduceSum", product, [1, 2], keepdims=False))
    return squares


def _ghost_sums(e: Emitter, factors: Sequence[_TargetFactors], trainable: Sequence[str], factor: str, finite: str,
                *, sanitise: bool) -> list[str]:
    """Σ_n factor[n]·x_nᵀ·g_n as ONE product over all tokens, the factors folded into g."""
    per_row = e.unsqueeze(factor, [1, 2])
    finite3 = e.unsqueeze(finite, [1, 2])
    zero = e.const(np.asarray(0.0, np.float32))
    blocks: dict[str, str] = {}

    def rows(name: str, width: int, scaled: bool) -> str:
        r = e.op("Reshape", [name, e.ints([0, -1, width])])
        if scaled:
            r = e.op("Mul", [r, per_row])
        if sanitise:
            r = e.op("Where", [finite3, r, zero])
        return e.op("Reshape", [r, e.ints([-1, width])])

    for f in factors:
        t, rank = f.target, f.rank
        a_name, b_name = lora_input_names(t.weight)
        if a_name in trainable:
            ga = e.op("MatMul", [e.op("Transpose", [rows(f.x, t.in_features, False)], perm=[1, 0]),
                                 rows(f.g_u, rank, True)])
            blocks[a_name] = e.op("Reshape", [ga, e.ints([1, -1])])
        gb = e.op("MatMul", [e.op("Transpose", [rows(f.u, rank, False)], perm=[1, 0]),
                             rows(f.g_y, t.out_features, True)])
        blocks[b_name] = e.op("Reshape", [gb, e.ints([1, -1])])
    return _ordered(blocks, trainable)


def _summed_gradient(e: Emitter, factors: Sequence[_TargetFactors], trainable: Sequence[str]) -> str:
    """Non-private: Σ_n G[n] as one product over all tokens of the batch per tensor."""
    blocks: dict[str, str] = {}
    for f in factors:
        t = f.target
        a_name, b_name = lora_input_names(t.weight)
        rank = e.dims(f.u)[-1]  # type: ignore[index]
        assert isinstance(rank, int)

        def flat(name: str, width: int) -> str:
            return e.op("Reshape", [name, e.ints([-1, width])])

        if a_name in trainable:
            ga = e.op("MatMul", [e.op("Transpose", [flat(f.x, t.in_features)], perm=[1, 0]), flat(f.g_u, rank)])
            blocks[a_name] = e.op("Reshape", [ga, e.ints([-1])])
        gb = e.op("MatMul", [e.op("Transpose", [flat(f.u, rank)], perm=[1, 0]), flat(f.g_y, t.out_features)])
        blocks[b_name] = e.op("Reshape", [gb, e.ints([-1])])
    parts = _ordered(blocks, trainable)
    return e.op("Concat", parts, axis=0) if len(parts) > 1 else parts[0]


def _update(e: Emitter, optimizer: Optimizer, weight_decay: float) -> list[str]:
    """The optimizer step on the flat vectors; returns the names of the updated outputs."""
    p, g, lr = PARAMS_INPUT, GRAD_OUTPUT, LEARNING_RATE_INPUT
    if optimizer == "sgd":
        e.nodes.append(helper.make_node("Sub", [p, e.op("Mul", [g, lr])], [PARAMS_OUTPUT], name="train/sgd"))
        return [PARAMS_OUTPUT]
    b1, b2 = ADAMW_BETAS
    f32 = np.float32

    def c(v: float) -> str:
        return e.const(np.asarray(v, f32))

    m = e.op("Add", [e.op("Mul", [MOMENT1_INPUT, c(b1)]), e.op("Mul", [g, c(1 - b1)])])
    v = e.op("Add", [e.op("Mul", [MOMENT2_INPUT, c(b2)]), e.op("Mul", [e.op("Mul", [g, g]), c(1 - b2)])])
    e.nodes.append(helper.make_node("Identity", [m], [MOMENT1_OUTPUT], name="train/adamw/m"))
    e.nodes.append(helper.make_node("Identity", [v], [MOMENT2_OUTPUT], name="train/adamw/v"))
    # ORT's AdamWOptimizer as onnxblock configures it (adam_mode 1, the Hugging Face
    # transformers arithmetic): p ← p - lr·sqrt(1 - β2^t)/(1 - β1^t) · m/(sqrt(v) + ε),
    # then the decoupled decay p ← p - lr·λ·p on the updated p.
    bc1 = e.op("Sub", [c(1.0), e.op("Pow", [c(b1), STEP_INPUT])])
    bc2 = e.op("Sub", [c(1.0), e.op("Pow", [c(b2), STEP_INPUT])])
    step_size = e.op("Div", [e.op("Mul", [lr, e.op("Sqrt", [bc2])]), bc1])
    denom = e.op("Add", [e.op("Sqrt", [v]), c(ADAMW_EPSILON)])
    moved = e.op("Sub", [p, e.op("Mul", [step_size, e.op("Div", [m, denom])])])
    if weight_decay:
        decay = e.op("Mul", [moved, e.op("Mul", [lr, c(weight_decay)])])
        e.nodes.append(helper.make_node("Sub", [moved, decay], [PARAMS_OUTPUT], name="train/adamw/update"))
    else:
        e.nodes.append(helper.make_node("Identity", [moved], [PARAMS_OUTPUT], name="train/adamw/update"))
    return [PARAMS_OUTPUT, MOMENT1_OUTPUT, MOMENT2_OUTPUT]

