"""The single-adapter serving graph with as few extra kernels as the graph allows.

At batch 1 an ONNX Runtime CPU kernel costs a few microseconds whatever its size, so the
LoRA overhead of the plain form (two MatMuls and an Add per target, see
:func:`lorad.adapters.lora_graph.make_inference_graph`) is mostly kernel count. This form is
the same arithmetic with fewer kernels:

* **shared A product**: targets whose linear nodes read the same input (q, k and v of an
  attention block) get one ``x·[A_q | A_k | A_v]`` product; each target's B is fed
  zero-padded to the group's rank, so ``(x·A_group)·B_t`` is exactly ``(x·A_t)·B_t``;
* **fold into the bias add**: ``MatMul(x, W)`` followed by ``Add(·, bias)`` becomes
  ``Sum(x·W, bias, delta)`` (one kernel instead of two adds); when x is 2-D the pair
  becomes ``Gemm(x, W, bias)`` and the delta ``Gemm(x·A, B, C=that)`` — the fusion ORT
  would have made of the base pair, kept, with the LoRA add inside the second Gemm;
* **Gemm targets**: ``Gemm(x·A, B, C=Gemm(x, W, c), alpha)`` folds the add likewise.

:class:`FusedLayout` says which session inputs the graph has and builds their values from
each target's (A, scale·B) padded to the slot rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .lora_graph import LoraTarget, target_nodes, tensor_ranks
from .onnx_compat import for_runtime

__all__ = ["FusedLayout", "make_fused_inference_graph"]

_LINEAR_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class _Group:
    a_input: str
    weights: tuple[str, ...]  # in the order of their blocks in A_group
    in_features: int


@dataclass(frozen=True)
class FusedLayout:
    """The LoRA session inputs of a fused graph and how to fill them."""

    rank: int
    groups: tuple[_Group, ...]
    #: B input name → (weight, offset of its block in the group, group rank, out features)
    b_inputs: Mapping[str, tuple[str, int, int, int]]

    @property
    def input_names(self) -> list[str]:
        return [g.a_input for g in self.groups] + list(self.b_inputs)

    def feeds(self, matrices: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Input arrays from per-target ``(A [in, r], B [r, out])`` at the slot rank r;
        targets missing from ``matrices`` get zeros (the base model)."""
        r = self.rank
        out: dict[str, np.ndarray] = {}
        for g in self.groups:
            if len(g.weights) == 1 and g.weights[0] in matrices:  # no copy for a group of one
                out[g.a_input] = matrices[g.weights[0]][0]
                continue
            a = np.zeros((g.in_features, r * len(g.weights)), np.float32)
            for i, w in enumerate(g.weights):
                if w in matrices:
                    a[:, i * r : (i + 1) * r] = matrices[w][0]
            out[g.a_input] = a
        for name, (w, offset, group_rank, out_features) in self.b_inputs.items():
            if group_rank == r and w in matrices:
                out[name] = matrices[w][1]
                continue
            b = np.zeros((group_rank, out_features), np.float32)
            if w in matrices:
                b[offset : offset + r] = matrices[w][1]
            out[name] = b
        return out


def make_fused_inference_graph(
    model: onnx.ModelProto, targets: Sequence[LoraTarget], *, rank: int
) -> tuple[onnx.ModelProto, FusedLayout]:
    """Derive the fused serving graph of ``model`` and its input layout."""
    if rank <= 0:
        raise ValueError(f"slot rank must be a positive integer, got {rank}")
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    by_weight = {t.weight: t for t in targets}
    ranks = tensor_ranks(model)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    # The nodes every derived graph splices (lora_graph.target_nodes): a weight read
    # directly or through a Transpose.
    found = target_nodes(graph, targets)
    weight_of = {id(n): t.weight for _, n, t in found}
    linear = [n for _, n, _ in found]
    uses: dict[str, int] = defaultdict(int)
    for n in linear:
        uses[weight_of[id(n)]] += 1
    # Group the nodes of once-used weights by (input, op); others stand alone.
    keyed: dict[tuple[str, ...], list[onnx.NodeProto]] = defaultdict(list)
    for n in linear:
        w = weight_of[id(n)]
        key = (n.input[0], n.op_type) if uses[w] == 1 else (n.input[0], n.op_type, n.name or str(id(n)), w)
        keyed[key].append(n)

    groups: list[_Group] = []
    b_inputs: dict[str, tuple[str, int, int, int]] = {}
    group_of: dict[int, tuple[str, str]] = {}  # id(node) → (xA tensor, B input)
    first_of_group: dict[int, onnx.NodeProto] = {}
    existing = {i.name for i in graph.input} | set(inits)
    for k, nodes in enumerate(keyed.values()):
        weights = tuple(weight_of[id(n)] for n in nodes)
        group_rank = rank * len(weights)
        a_input = f"lora.fused.{k}.A"
        xa = f"lora.fused/{k}/xA"
        groups.append(_Group(a_input, weights, by_weight[weights[0]].in_features))
        graph.input.append(helper.make_tensor_value_info(a_input, TensorProto.FLOAT, [by_weight[weights[0]].in_features, group_rank]))
        for i, n in enumerate(nodes):
            w = weight_of[id(n)]
            b_input = f"lora.fused.{w}.B" if uses[w] == 1 else f"lora.fused.{k}.{w}.B"
            if b_input not in b_inputs:
                b_inputs[b_input] = (w, i * rank, group_rank, by_weight[w].out_features)
                graph.input.append(helper.make_tensor_value_info(
                    b_input, TensorProto.FLOAT, [group_rank, by_weight[w].out_features]))
            group_of[id(n)] = (xa, b_input)
        first_of_group[id(nodes[0])] = helper.make_node("MatMul", [nodes[0].input[0], a_input], [xa], name=xa)
    for name in (*(g.a_input for g in groups), *b_inputs):
        if name in existing:
            raise ValueError(f"model already has a tensor named {name!r}")

    removed: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if id(node) in removed:
            continue
        if id(node) in first_of_group:
            new_nodes.append(first_of_group[id(node)])
        new_nodes.append(node)
        if id(node) not in group_of:
            continue
        xa, b_input = group_of[id(node)]
        target = by_weight[weight_of[id(node)]]
        prefix = f"lora.fused/{index}/{target.weight}"
        new_nodes.extend(_fold(node, target, xa, b_input, prefix, consumers, inits, outputs, ranks, removed))
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(derived)
    return for_runtime(derived), FusedLayout(rank, tuple(groups), b_inputs)


def _fold(
    node: onnx.NodeProto, target: LoraTarget, xa: str, b_input: str, prefix: str,
    consumers: Mapping[str, list[onnx.NodeProto]], inits: Mapping[str, onnx.TensorProto],
    outputs: set[str], ranks: Mapping[str, int], removed: set[int],
) -> list[onnx.NodeProto]:
    """The nodes after ``node`` that add ``(x·A)·B`` to its result, folded where possible."""
    out = node.output[0]

    def gemm(inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node("Gemm", inputs, [output], name=output, **attrs)

    if node.op_type == "Gemm":
        base = f"{prefix}/base"
        node.output[0] = base
        return [gemm([xa, b_input, base], out, alpha=target.gemm_alpha, beta=1.0)]

    bias_add = _bias_add(out, consumers, inits, outputs)
    if bias_add is not None:
        bias = next(i for i in bias_add.input if i != out)
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and ranks.get(node.input[0]) == 2 \
                and len(inits[bias].dims) == 1:
            # MatMul + Add(bias) on 2-D rows: the Gemm ORT would fuse, then the LoRA Gemm
            # (a quantised MatMulNBits stays itself: the bias joins the Sum below).
            removed.add(id(bias_add))
            base = f"{prefix}/base"
            node.op_type = "Gemm"
            node.output[0] = base
            node.input.append(bias)
            return [gemm([xa, b_input, base], bias_add.output[0], beta=1.0)]
        delta = f"{prefix}/xAB"
        bias_add.op_type = "Sum"
        bias_add.input.append(delta)
        return [helper.make_node("MatMul", [xa, b_input], [delta], name=delta)]
    base = f"{prefix}/base"
    node.output[0] = base
    delta = f"{prefix}/xAB"
    return [
        helper.make_node("MatMul", [xa, b_input], [delta], name=delta),
        helper.make_node("Add", [base, delta], [out], name=f"{prefix}/add"),
    ]


def _bias_add(
    out: str, consumers: Mapping[str, list[onnx.NodeProto]], inits: Mapping[str, onnx.TensorProto], outputs: set[str]
) -> onnx.NodeProto | None:
    """The ``Add(out, bias)`` that alone consumes ``out``, bias an initializer; else None."""
    users = consumers.get(out, [])
    if out in outputs or len(users) != 1:
        return None
    add = users[0]
    if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    return add if other in inits else None
