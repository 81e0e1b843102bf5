"""The values an integer model input may hold, read from the graph.

A token id indexes an embedding table: an input that reaches the indices of a ``Gather``
over an initializer of ``V`` rows (directly, or through casts and reshapes) may hold
0..V-1; any other value makes ONNX Runtime fail on the whole batch, or reads a row that
no token has. An ``attention_mask`` holds 0 or 1; anything else turns the attention's
additive mask into garbage (a ``-1`` gives NaN). The trainer checks stored examples
against these domains at ingestion, so that one bad example is refused with a message
instead of failing a private run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import TensorProto

__all__ = ["InputDomain", "input_domains"]

_INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
#: Ops that pass an index tensor on unchanged in value.
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}
_MASK_NAMES = ("attention_mask",)
_MASK_WHAT = "a mask"


@dataclass(frozen=True)
class InputDomain:
    """Inclusive bounds of an input's values and what they are, for the error message."""

    low: int
    high: int
    what: str

    def describe(self) -> str:
        return f"{self.low}..{self.high} ({self.what})"

    @property
    def is_mask(self) -> bool:
        return self.what == _MASK_WHAT


def input_domains(model: onnx.ModelProto) -> dict[str, InputDomain]:
    """The integer inputs whose values the graph bounds (see the module docstring)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    domains: dict[str, InputDomain] = {}
    for vi in graph.input:
        if vi.name in inits or vi.type.tensor_type.elem_type not in _INTEGER_TYPES:
            continue
        if vi.name in _MASK_NAMES:
            domains[vi.name] = InputDomain(0, 1, _MASK_WHAT)
            continue
        rows = _table_rows(vi.name, consumers, inits)
        if rows is not None:
            domains[vi.name] = InputDomain(0, rows - 1, f"ids of the model's {rows}-row embedding table")
    return domains


def _table_rows(name: str, consumers: dict[str, list[onnx.NodeProto]],
                inits: dict[str, onnx.TensorProto]) -> int | None:
    """Rows of the smallest initializer table ``name`` indexes (None: it indexes none)."""
    seen: set[str] = set()
    frontier = [name]
    rows: list[int] = []
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor \
                    and node.input[0] in inits and inits[node.input[0]].dims:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                rows.append(int(inits[node.input[0]].dims[axis]))
            elif node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                frontier.extend(node.output)
    return min(rows) if rows else None
