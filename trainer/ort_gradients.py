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


def _gelu_nodes(graph: onnx.GraphProto, node: onnx.NodeProto, fresh: "_Fresh") -> list[onnx.NodeProto]:
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


_OP_IN_MESSAGE = re.compile(r"(?:gradient builder for|GradientBuilder for|op_type[:=]\s*)\W*([A-Za-z][A-Za-z0-9_]*)")


def gradient_error(model: onnx.ModelProto, error: BaseException) -> str:
    """A message for ORT failing to build the gradient of ``model``: op, nodes, what works."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    m = _OP_IN_MESSAGE.search(str(error))
    where = ""
    if m:
        op = m.group(1)
        nodes = [n.name or f"#{i}" for i, n in enumerate(model.graph.node) if n.op_type == op]
        where = f"op {op} (nodes: {', '.join(nodes[:5]) or 'none'}{', ...' if len(nodes) > 5 else ''}): "
    return (
        f"ONNX Runtime cannot build the training gradient of this model: {where}{text}. "
        f"lorad trains graphs whose ops between the LoRA targets and the output have ORT gradients "
        f"(MatMul, Gemm, Add, Mul, Div, Softmax, Erf, Tanh, Reshape, Transpose, Gather, ...); "
        f"it rewrites {', '.join(REWRITTEN_OPS)} itself"
    )


class _Fresh:  # the type of ``fresh`` above, for the annotation only
    def __call__(self, base: str) -> str:  # pragma: no cover - typing aid
        raise NotImplementedError
