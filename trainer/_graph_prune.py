"""Removing what an ONNX graph no longer uses, shared by both training backends' surgery."""

from __future__ import annotations

import onnx

__all__ = ["drop_unused"]


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing uses, repeatedly, then unused initializers."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
