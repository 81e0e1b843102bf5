"""Gradients of whole forward subgraphs that an exporter wrote out op by op.

The node-by-node rules of :mod:`.rules` differentiate a decomposed function exactly but
not cheaply: each op's rule writes its own full-size tensors, and the chain rule through
five elementwise ops costs about twice the passes over memory that the derivative of the
function itself needs. :func:`find_composites` recognises such subgraphs; the backward
pass (:mod:`.backward`) then emits one derivative for the whole and never visits the
inner nodes.

Recognised:

- **exact GELU without its ½**, as torch exports ``x·½·(1 + erf(x/√2))`` from Hugging
  Face BERT (MiniLM included): ``a = x/√2`` (Div by √2 or Mul by 1/√2), ``e = erf(a)``,
  ``b = e + 1``, ``y = x·b``. ``dy/dx = b + x·√(2/π)·exp(-a²)``, from the forward's own
  ``a`` and ``b``: five passes where the op rules take nine. The ½ that follows stays
  its own Mul (ORT folds it into the next MatMul).

A subgraph is only taken whole when its inner tensors feed nothing else (so no other
gradient can flow through them) and are no graph outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .emitter import Emitter

__all__ = ["Composite", "find_composites"]

_SQRT2 = math.sqrt(2.0)
#: ln √(2/π): the factor of the Gaussian density folded into the exponent.
_LN_SQRT_2_OVER_PI = 0.5 * math.log(2.0 / math.pi)


@dataclass(frozen=True)
class Composite:
    """A forward subgraph differentiated as one function: ``output`` depends, through
    ``inner`` node outputs only, on the single differentiable input ``x``."""

    kind: str
    x: str
    output: str
    inner: frozenset[str]
    #: forward tensors the derivative reads (by role)
    saved: Mapping[str, str]

    def gradient(self, e: Emitter, g: str) -> str:
        """The gradient of ``x`` from the gradient ``g`` of ``output``."""
        return _GRADIENTS[self.kind](e, self, g)


def _gelu_exact_half(e: Emitter, c: Composite, g: str) -> str:
    x, a, b = c.x, c.saved["a"], c.saved["b"]
    # x·√(2/π)·exp(-a²) = x·exp(ln√(2/π) - a²)
    density = e.op("Exp", [e.op("Sub", [e.scalar_like(_LN_SQRT_2_OVER_PI, x), e.op("Mul", [a, a])])])
    return e.op("Mul", [g, e.op("Add", [b, e.op("Mul", [x, density])])], "gelu_grad")


_GRADIENTS: dict[str, Callable[[Emitter, Composite, str], str]] = {"gelu_exact_half": _gelu_exact_half}


def _is_scalar(constants: Mapping[str, np.ndarray], name: str, value: float, *, rtol: float = 1e-6) -> bool:
    v = constants.get(name)
    return v is not None and v.size == 1 and np.issubdtype(v.dtype, np.floating) and \
        math.isclose(float(v.reshape(-1)[0]), value, rel_tol=rtol)


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a two-input node that reads ``name``."""
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def find_composites(graph: onnx.GraphProto, constants: Mapping[str, np.ndarray]) -> dict[str, Composite]:
    """Composites of ``graph`` by the name of the node output they replace (see the module
    docstring)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_consumer(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, Composite] = {}
    for node in graph.node:
        if node.op_type != "Erf":
            continue
        a, erf = node.input[0], node.output[0]
        scale = producers.get(a)
        if scale is None or only_consumer(a) is not node:
            continue
        x = _scaled_input(scale, constants)
        add = only_consumer(erf)
        if x is None or add is None or add.op_type != "Add" or not _is_scalar(constants, _other(add, erf) or "", 1.0):
            continue
        b = add.output[0]
        mul = only_consumer(b)
        if mul is None or mul.op_type != "Mul" or _other(mul, b) != x:
            continue
        found[mul.output[0]] = Composite("gelu_exact_half", x, mul.output[0], frozenset({a, erf, b}),
                                         {"a": a, "b": b})
    return found


def _scaled_input(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> str | None:
    """x of ``x/√2`` (Div) or ``x·(1/√2)`` (Mul, either order); None for any other node."""
    if node.op_type == "Div" and len(node.input) == 2 and _is_scalar(constants, node.input[1], _SQRT2):
        return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2:
        for k in (0, 1):
            if _is_scalar(constants, node.input[k], 1.0 / _SQRT2):
                return node.input[1 - k]
    return None
