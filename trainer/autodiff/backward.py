"""Reverse-mode differentiation of an ONNX graph into more ONNX nodes.

:func:`backward` walks the forward graph once, backwards, from seed gradients (e.g. the
loss gradient of the logits) and emits, through the emitter, the gradient of every
tensor that depends on one of the ``sources`` (the LoRA matrices). Only those tensors
get gradients: the frozen graph's weights and everything computed from data alone never
do, which keeps the backward pass at activation gradients. The sources themselves are
not differentiated either: their gradients are per example, which the step graph builds
from the activations and output gradients this returns.

Every node that lies on a gradient path needs a rule in :data:`rules.RULES`; the first
one without is refused, naming the op and the node. Subgraphs that an exporter wrote out
op by op (exact GELU) are differentiated as one function (:mod:`.composite`): their inner
nodes are never visited.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .composite import find_composites
from .emitter import Emitter, TensorInfo
from .rules import ZERO_GRADIENT, rule_for

__all__ = ["graph_constants", "requires_grad", "backward"]


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name (rules read axes and indices from them)."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_ints", "value_int"):
                    values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(a), np.int64)
    return values


def requires_grad(graph: onnx.GraphProto, sources: Collection[str], infos: Mapping[str, TensorInfo]) -> set[str]:
    """Tensors whose value depends, through differentiable floats, on a source."""
    needed = set(sources)
    for node in graph.node:
        if node.op_type in ZERO_GRADIENT or not any(i in needed for i in node.input if i):
            continue
        for out in node.output:
            info = infos.get(out)
            if out and (info is None or info.is_float):
                needed.add(out)
    return needed


def backward(
    graph: onnx.GraphProto, emitter: Emitter, seeds: Mapping[str, str], sources: Collection[str],
    *, differentiate_sources: bool = False,
) -> dict[str, str]:
    """Gradients (tensor name → gradient name) of every tensor on a path from a source to a seed.

    ``differentiate_sources`` also returns the sources' own gradients (summed over the
    batch, as any other tensor's); the step graph leaves it off and builds per-example ones.

    ``graph.node`` must be in topological order (ONNX requires it), so every consumer of
    a tensor is visited before its producer and its gradient parts are complete then.
    """
    needed = requires_grad(graph, sources, emitter.infos)
    parts: dict[str, list[str]] = {}
    for name, grad in seeds.items():
        if name not in needed:
            raise ValueError(f"the loss does not depend on the LoRA matrices through {name!r}")
        parts[name] = [emitter.record(grad, name)]
    done: dict[str, str] = {}

    def total(name: str) -> str | None:
        got = parts.pop(name, None)
        if not got:
            return None
        grad = got[0] if len(got) == 1 else emitter.record(emitter.op("Sum", got, "grad_sum"), name)
        done[name] = grad
        return grad

    stop = set() if differentiate_sources else set(sources)
    composites = find_composites(graph, emitter.constants)
    for node in reversed(graph.node):
        if not any(out in parts for out in node.output):
            continue
        whole = composites.get(node.output[0]) if len(node.output) == 1 else None
        if whole is not None:
            g = total(whole.output)
            assert g is not None
            if whole.x in needed and whole.x not in stop:
                parts.setdefault(whole.x, []).append(emitter.record(whole.gradient(emitter, g), whole.x))
            continue
        gouts = [total(out) if out in parts else None for out in node.output]
        want = [bool(i) and i in needed and i not in stop for i in node.input]
        if not any(want):
            continue
        grads = rule_for(node)(emitter, node, gouts, want)
        # a rule may leave out the gradients of trailing optional inputs
        for name, maybe, wanted in zip(node.input, grads, want, strict=False):
            if wanted and maybe is not None:
                parts.setdefault(name, []).append(emitter.record(maybe, name))
    for name in list(parts):
        total(name)
    return done
