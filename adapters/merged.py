"""The merged fast path: the adapter most requests ask for, folded into the base weights.

A LoRA path costs its extra kernels on every request (MiniLM: about 3% of arithmetic,
more in memory traffic), while a session whose target weights are ``W + A·(scale·B)`` runs
at the base model's cost. On a device that serves one user most requests name one
adapter, so the engine keeps, besides its base and LoRA sessions, one **merged session**
for the adapter that dominates the recent requests:

* **when**: an adapter is merged once it has answered more than half of the last
  ``window`` requests that named an adapter; one merge is built at a time, in a
  background thread, while its requests keep running on the LoRA session;
* **exact**: the merged weight is summed in float64 and rounded once, so it differs from
  the LoRA session's answer by float32 rounding only (tests/unit/test_merged.py);
* **hot swap**: a merged session belongs to one :class:`PreparedAdapter` object (one
  version); a new version is another object, served by the LoRA session from its first
  request, so a swap never waits for a build: the serving pause is the cache's swap;
* **memory**: the merged target weights must fit ``cache.merged_bytes`` (0 turns the path
  off); there is one merged session at most (the previous one is dropped when a build
  starts), and it is dropped when its adapter leaves the cache.

Quantised targets (MatMulNBits) are never merged: the sum would have to be quantised
again, which is not the model the adapter was trained on.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from .lora_graph import LoraTarget, target_nodes
from .module_paths import linear_weight_resolver

__all__ = ["MergedPath", "merged_model", "merge_blocker"]

_log = logging.getLogger(__name__)

#: Requests naming an adapter that the dominance is judged over.
WINDOW = 64


class _Prepared(Protocol):
    """What the merged path reads of an :class:`lorad.adapters.engine.PreparedAdapter`."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def matrices(self) -> Any: ...


def merge_blocker(model: onnx.ModelProto, targets: Sequence[LoraTarget]) -> str | None:
    """Why ``model``'s targets cannot be merged, or None: a quantised target, or a target
    weight that something besides its linear nodes reads (a tied embedding table)."""
    weights = {t.weight for t in targets}
    if any(t.op == "MatMulNBits" for t in targets):
        return "a target is quantised (MatMulNBits)"
    found = target_nodes(model.graph, targets)  # held: the node wrappers' ids stay theirs
    linear = {id(n) for _, n, _ in found}
    via = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input and n.input[0] in weights}
    for node in model.graph.node:
        if id(node) in linear or (node.op_type == "Transpose" and node.input and node.input[0] in weights):
            continue
        read = [i for i in node.input if i in weights or i in via]
        if read:
            return f"target weight {read[0]!r} is also read by {node.op_type} node {node.name!r}"
    return None


def merged_model(model: onnx.ModelProto, targets: Sequence[LoraTarget],
                 matrices: Any) -> onnx.ModelProto:
    """``model`` with each target weight ``W`` replaced by ``W + A·B`` (``matrices``: weight →
    (A [in, r], scale·B [r, out])), summed in float64, stored as W is (transposed or not)."""
    stored_transposed = _stored_transposed(model, targets)
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    for init in merged.graph.initializer:
        pair = matrices.get(init.name)
        if pair is None or init.name not in stored_transposed:
            continue
        a, b = pair
        delta = a.astype(np.float64) @ b.astype(np.float64)  # [in, out]
        if stored_transposed[init.name]:  # stored [out, in]: Gemm transB, or read through a Transpose
            delta = delta.T
        w = numpy_helper.to_array(init).astype(np.float64)
        init.CopyFrom(numpy_helper.from_array((w + delta).astype(np.float32), init.name))
    return merged


def _stored_transposed(model: onnx.ModelProto, targets: Sequence[LoraTarget]) -> dict[str, bool]:
    """Per target weight, whether it is stored ``[out, in]``: read by a Gemm with ``transB``,
    or through a ``Transpose`` (TorchScript at opset 20), not both. From the graph, never
    from the shapes: a square weight looks the same either way."""
    resolve = linear_weight_resolver(model.graph)
    found = target_nodes(model.graph, targets)
    out: dict[str, bool] = {}
    for _, node, target in found:
        hit = resolve(node)
        through_transpose = bool(hit and hit[1])
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        out[target.weight] = through_transpose != trans_b
    return out


class MergedPath:
    """The merged session of the dominant adapter (see the module docstring)."""

    def __init__(self, build: Callable[[Any], Any], *, window: int = WINDOW) -> None:
        """``build(prepared)`` makes the merged session (called in the builder thread)."""
        self._build = build
        self._window: collections.deque[int] = collections.deque(maxlen=window)
        self._counts: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self._merged: tuple[weakref.ref[_Prepared], Any] | None = None
        self._builder: threading.Thread | None = None
        self.builds = 0  # merged sessions made, for tests and the log

    def session_for(self, prepared: _Prepared) -> Any | None:
        """The merged session if it is ``prepared``'s; counts the request, and starts a build
        when ``prepared`` has come to dominate."""
        key = id(prepared)
        with self._lock:
            merged = self._merged
            if merged is not None:
                owner = merged[0]()
                if owner is prepared:
                    return merged[1]
                if owner is None:  # its adapter left the cache, or was replaced: free the session
                    self._merged = None
            if len(self._window) == self._window.maxlen:
                old = self._window[0]
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
            self._window.append(key)
            self._counts[key] += 1
            if self._counts[key] * 2 > self._window.maxlen and self._builder is None:  # type: ignore[operator]
                self._builder = threading.Thread(target=self._make, args=(prepared,), name="lorad-merge", daemon=True)
                self._builder.start()
        return None

    def wait(self) -> None:
        """Until the build under way (if any) has finished: for tests and benchmarks."""
        builder = self._builder
        if builder is not None:
            builder.join()

    @property
    def merged(self) -> tuple[str, int] | None:
        """(name, version) of the adapter merged now."""
        merged = self._merged
        owner = merged[0]() if merged is not None else None
        return (owner.name, owner.version) if owner is not None else None

    def _make(self, prepared: _Prepared) -> None:
        with self._lock:
            self._merged = None  # one merged session at a time, the one being replaced included
        try:
            session = self._build(prepared)
        except Exception:  # the LoRA session goes on serving; say why once
            _log.exception("merging adapter %r version %s failed; it stays on the LoRA session", prepared.name, prepared.version)
            session = None
        with self._lock:
            if session is not None:
                self._merged = (weakref.ref(prepared), session)
                self.builds += 1
                _log.info("adapter %r version %s merged into its own session: it dominates the recent requests",
                          prepared.name, prepared.version)
            self._window.clear()
            self._counts.clear()
            self._builder = None
