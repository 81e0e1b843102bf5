"""Make exported graphs acceptable to ONNX Runtime's gradient builder.

Exporters emit what inference needs; ORT's training gradient builder (1.19) wants more or
other nodes for some ops. These rewrites keep the forward computation and change only
how it is spelled:

* ``LayerNormalization`` with one output (every exporter): ORT's LayerNormalization
  gradient reads the saved ``Mean`` and ``InvStdDev`` outputs, so the node declares them
  (otherwise ORT fails with an assertion ``i < node_->OutputDefs().size()``);
* exporters share one initializer between equal LayerNorm weights (all ones at init);
  ORT then emits the frozen weight's gradient once per node under one name and rejects
  its own graph ("Duplicate definition of name ..._grad"), so each LayerNormalization
  gets its own copy of a shared scale or bias, and the TorchScript exporter's
  ``Identity`` nodes over a shared initializer become initializers of their own;
* ``Gelu`` of the ONNX domain (opset 20, fused by the exporters) has no gradient in ORT:
  it is written out as ``0.5·x·(1 + erf(x/√2))`` (or the tanh form for
  ``approximate="tanh"``), which is what the opset-17 exports contain anyway.

:func:`gradient_error` turns ORT's raw failure into a message that names the op and the
nodes of the graph that use it, and says what lorad supports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["prepare_for_gradients", "gradient_error", "REWRITTEN_OPS"]

#: Ops whose exported form is rewritten here before ORT builds gradients.
REWRITTEN_OPS = ("LayerNormalization (one output, shared weights)", "Gelu (opset 20)")


def prepare_for_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``model`` in place (see the module docstring) and return it."""
    graph = model.graph
    used = {name for node in graph.node for name in (*node.input, *node.output)}
    used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def own_copy(source: str, name: str) -> None:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[source])
        copy.name = name
        graph.initializer.append(copy)
        inits[name] = copy

    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Identity" and node.input and node.input[0] in inits and node.output[0] not in outputs:
            own_copy(node.input[0], node.output[0])  # a constant: the Identity goes
            uses[node.input[0]] -= 1
            continue
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            for k in (1, 2):
                if len(node.input) > k and node.input[k] in inits and uses[node.input[k]] > 1:
                    uses[node.input[k]] -= 1
                    name = fresh(f"{node.input[k]}/{node.name or index}")
                    own_copy(node.input[k], name)
                    node.input[k] = name
            while len(node.output) < 3:
                node.output.append(fresh(f"{node.name or f'layernorm_{index}'}/saved_{len(node.output)}"))
            for k in (1, 2):
                if not node.output[k]:
                    node.output[k] = fresh(f"{node.name or f'layernorm_{index}'}/saved_{k}")
            new_nodes.append(node)
        elif node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            new_nodes.extend(_gelu_nodes(graph, node, fresh))
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def _gelu_nodes(graph: onnx.GraphProto, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
    approximate = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate"), b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
    x, y = node.input[0], node.output[0]
    base = node.name or f"gelu_{y}"
    nodes: list[onnx.NodeProto] = []

    def const(suffix: str, value: float) -> str:
        name = fresh(f"{base}/{suffix}")
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def op(kind: str, inputs: list[str], suffix: str, out: str | None = None) -> str:
        name = out or fresh(f"{base}/{suffix}")
        nodes.append(helper.make_node(kind, inputs, [name], name=fresh(f"{base}/{suffix}_node")))
        return name

    if approximate == "tanh":
        # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        cube = op("Mul", [op("Mul", [x, x], "x2"), x], "x3")
        inner = op("Add", [x, op("Mul", [cube, const("c", 0.044715)], "cx3")], "inner")
        t = op("Tanh", [op("Mul", [inner, const("k", math.sqrt(2 / math.pi))], "scaled")], "tanh")
        one_plus = op("Add", [t, const("one", 1.0)], "one_plus")
    else:
        e = op("Erf", [op("Mul", [x, const("inv_sqrt2", 1 / math.sqrt(2))], "scaled")], "erf")
        one_plus = op("Add", [e, const("one", 1.0)], "one_plus")
    half_x = op("Mul", [x, const("half", 0.5)], "half_x")
    op("Mul", [half_x, one_plus], "out", out=y)
    return nodes


_NOT_REGISTERED = re.compile(r"has not been registered: (?P<op>[A-Za-z0-9_]+) for node (?P<node>.+?)\.?$", re.M)
_RAW_PREFIX = re.compile(r"^.*?(?:was false\.|: FAIL : )\s*", re.S)


def gradient_error(model: onnx.ModelProto, error: BaseException) -> str:
    """A message for ORT failing to build the gradient of ``model``: op, node, what works."""
    raw = str(error).strip()
    m = _NOT_REGISTERED.search(raw)
    if m:
        what = f"op {m.group('op')} (node {m.group('node')!r}) has no gradient in ONNX Runtime's training builder"
    else:  # not one lorad knows: keep ORT's sentence, without its C++ source location
        what = _RAW_PREFIX.sub("", raw, count=1) or type(error).__name__
    return (
        f"cannot build the training graph: {what}. lorad trains models whose ops between the LoRA "
        "targets and the loss have ORT gradients (MatMul, Gemm, Add, Sub, Mul, Div, Softmax, Erf, Tanh, "
        "Relu, Sigmoid, Reshape, Transpose, Gather, ReduceMean, LayerNormalization, ...) and rewrites "
        f"{', '.join(REWRITTEN_OPS)} itself; train a model without this op, or keep the op out of the "
        "path from the targets to the output"
    )
