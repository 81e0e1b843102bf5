"""The single-adapter serving graph: the LoRA arithmetic with ONNX Runtime's own fusions left intact.

Per target weight ``W`` the graph adds ``(x·A)·B`` (scale folded into B) to ``x·W``; this
form keeps that arithmetic and no more, and leaves the base model's nodes as ORT's
optimiser expects them:

* **shared A product**: targets whose linear nodes read the same input (q, k and v of an
  attention block) get one ``x·[A_q | A_k | A_v]`` product, ``Split`` into each target's
  ``x·A_t``; each B is its own ``[r, out]`` input, never zero-padded to the group;
* **added before the bias**: ``MatMul(x, W)`` followed by ``Add(·, bias)`` becomes
  ``Add(MatMul(x, W), (x·A)·B)`` then the same bias ``Add``, so ORT still fuses the bias
  into what follows it (``BiasGelu``); when x is 2-D the pair becomes ``Gemm(x, W, bias)``
  and the delta ``Gemm(x·A, B, C=that)`` — the fusion ORT would have made of the base pair,
  kept, with the LoRA add inside the second Gemm;
* **Gemm targets**: ``Gemm(x·A, B, C=Gemm(x, W, c), alpha)`` folds the add likewise.

:class:`FusedLayout` says which session inputs the graph has and builds their values from
each target's (A, scale·B) at the slot rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .lora_graph import LoraTarget, target_nodes, tensor_ranks
from .onnx_compat import for_runtime

__all__ = ["FusedLayout", "make_fused_inference_graph"]


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
    #: B input name → (target weight, out features)
    b_inputs: Mapping[str, tuple[str, int]]
    _zero_inputs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [g.a_input for g in self.groups] + list(self.b_inputs)

    def place(
        self, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The session inputs for one adapter, and each of its targets' (A, B) at the slot rank
        as views of them (what the banks of mixed batches copy into a slot): one copy of the
        adapter's numbers in all. ``pairs``: weight → (A [in, r'], scale·B [r', out]), r' ≤
        the slot rank; targets not in ``pairs`` read zeros (the base model's answer)."""
        r = self.rank
        feeds: dict[str, np.ndarray] = {}
        views: dict[str, list[np.ndarray]] = {}
        for g in self.groups:
            if not any(w in pairs for w in g.weights):
                feeds[g.a_input] = self._zeros(g.in_features, r * len(g.weights))
                continue
            a = np.zeros((g.in_features, r * len(g.weights)), np.float32)
            for i, w in enumerate(g.weights):
                if w in pairs:
                    block = pairs[w][0]
                    a[:, i * r : i * r + block.shape[1]] = block
                    views[w] = [a[:, i * r : (i + 1) * r]]
            feeds[g.a_input] = a
        for name, (w, out_features) in self.b_inputs.items():
            if w not in pairs:
                feeds[name] = self._zeros(r, out_features)
                continue
            block = pairs[w][1]
            b = block if block.shape[0] == r and block.dtype == np.float32 and block.flags.c_contiguous \
                else np.zeros((r, out_features), np.float32)
            if b is not block:
                b[: block.shape[0]] = block
            feeds[name] = b
            views[w].append(b)
        return feeds, {w: (v[0], v[1]) for w, v in views.items()}

    def _zeros(self, rows: int, cols: int) -> np.ndarray:
        """A zero input, one per shape for all adapters: read-only, which is how the
        engine tells it from an adapter's own memory."""
        key = (rows, cols)
        zero = self._zero_inputs.get(key)
        if zero is None:
            zero = np.zeros(key, np.float32)
            zero.flags.writeable = False
            zero = self._zero_inputs.setdefault(key, zero)
        return zero


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
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

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
    b_inputs: dict[str, tuple[str, int]] = {}
    xa_of: dict[int, tuple[str, str]] = {}  # id(node) → (its x·A tensor, its B input)
    before: dict[int, list[onnx.NodeProto]] = {}  # the A product (and Split) ahead of a group's first node
    existing = {i.name for i in graph.input} | set(inits)
    for k, nodes in enumerate(keyed.values()):
        weights = tuple(weight_of[id(n)] for n in nodes)
        a_input = f"lora.fused.{k}.A"
        xa = f"lora.fused/{k}/xA"
        in_features = by_weight[weights[0]].in_features
        groups.append(_Group(a_input, weights, in_features))
        graph.input.append(helper.make_tensor_value_info(a_input, TensorProto.FLOAT, [in_features, rank * len(weights)]))
        product = [helper.make_node("MatMul", [nodes[0].input[0], a_input], [xa], name=xa)]
        parts = [xa] if len(nodes) == 1 else [f"{xa}/{i}" for i in range(len(nodes))]
        if len(nodes) > 1:
            sizes = np.full(len(nodes), rank, np.int64)
            if opset >= 13:
                split = f"lora.fused/{k}/split"
                graph.initializer.append(numpy_helper.from_array(sizes, split))
                product.append(helper.make_node("Split", [xa, split], parts, name=f"{xa}/split", axis=-1))
            else:
                product.append(helper.make_node("Split", [xa], parts, name=f"{xa}/split", axis=-1, split=sizes.tolist()))
        before[id(nodes[0])] = product
        for i, n in enumerate(nodes):
            w = weight_of[id(n)]
            b_input = f"lora.fused.{w}.B" if uses[w] == 1 else f"lora.fused.{k}.{w}.B"
            if b_input not in b_inputs:
                b_inputs[b_input] = (w, by_weight[w].out_features)
                graph.input.append(helper.make_tensor_value_info(b_input, TensorProto.FLOAT, [rank, by_weight[w].out_features]))
            xa_of[id(n)] = (parts[i], b_input)
    for name in (*(g.a_input for g in groups), *b_inputs):
        if name in existing:
            raise ValueError(f"model already has a tensor named {name!r}")

    removed: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if id(node) in removed:
            continue
        new_nodes.extend(before.get(id(node), ()))
        new_nodes.append(node)
        if id(node) not in xa_of:
            continue
        xa, b_input = xa_of[id(node)]
        target = by_weight[weight_of[id(node)]]
        prefix = f"lora.fused/{index}/{target.weight}"
        new_nodes.extend(_delta(node, target, xa, b_input, prefix, consumers, inits, outputs, ranks, removed))
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(derived)
    return for_runtime(derived), FusedLayout(rank, tuple(groups), b_inputs)


def _delta(
    node: onnx.NodeProto, target: LoraTarget, xa: str, b_input: str, prefix: str,
    consumers: Mapping[str, list[onnx.NodeProto]], inits: Mapping[str, onnx.TensorProto],
    outputs: set[str], ranks: Mapping[str, int], removed: set[int],
) -> list[onnx.NodeProto]:
    """The nodes after ``node`` that add ``(x·A)·B`` to its result."""
    out = node.output[0]
    base = f"{prefix}/base"

    def gemm(inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node("Gemm", inputs, [output], name=output, **attrs)

    if node.op_type == "Gemm":
        node.output[0] = base
        return [gemm([xa, b_input, base], out, alpha=target.gemm_alpha, beta=1.0)]
    bias_add = _bias_add(out, consumers, inits, outputs)
    if bias_add is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx") \
            and ranks.get(node.input[0]) == 2:
        bias = next(i for i in bias_add.input if i != out)
        if len(inits[bias].dims) == 1:
            # MatMul + Add(bias) on 2-D rows: the Gemm ORT would fuse, then the LoRA Gemm.
            removed.add(id(bias_add))
            node.op_type = "Gemm"
            node.output[0] = base
            node.input.append(bias)
            return [gemm([xa, b_input, base], bias_add.output[0], beta=1.0)]
    # Added before any bias add, which stays as the base graph has it for ORT's fusions.
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
