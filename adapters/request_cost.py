"""What one inference request costs in memory, and how it runs within a bound.

A body-size limit bounds bytes, not what the model allocates for them: on MiniLM one
341 KB request of 1,024 short texts took the daemon from 1.1 to 2.9 GB. What the
activations grow with is the model's unit of work:

- a model that reads token ids (a text model, or an exported encoder whose input indexes
  an embedding table, found by :mod:`lorad.adapters.input_domains`): **tokens**, the
  elements of its token-id input (texts × padded length);
- any other model: **rows**, the first dimension of its inputs.

:class:`RequestCost` measures a request in that unit, refuses one above the per-request
limit (:class:`RequestTooLargeError`, HTTP 413 naming the setting) and cuts a larger one
into chunks of at most ``chunk_tokens`` tokens (or ``chunk_rows`` rows) that run one after
another (:meth:`lorad.adapters.service.AdapterService.run`), so that the memory a request
holds at any time is one chunk's activations plus its outputs, whatever its size. The
HTTP layer lets ``large_requests`` chunked requests run at a time (others wait, then get
503), so concurrent large requests share one bound, and a small request never queues
behind them: it runs between their chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import RequestTooLargeError
from .input_domains import InputDomain

__all__ = ["RequestLimits", "RequestCost"]


@dataclass(frozen=True)
class RequestLimits:
    """The bounds (``server.*`` in the daemon's config)."""

    #: Most tokens (texts × padded length) one request of a token model may carry.
    max_request_tokens: int = 65536
    #: Tokens one model call runs at most; a larger request runs in chunks.
    chunk_tokens: int = 2048
    #: Rows one model call of a model without token ids runs at most.
    chunk_rows: int = 256


class RequestCost:
    """A request's cost in its model's unit, the per-request limit, and its chunks."""

    def __init__(self, inputs: Sequence[Any], domains: Mapping[str, InputDomain], limits: RequestLimits) -> None:
        self.limits = limits
        names = [i.name for i in inputs]
        #: The token-id input whose elements are the request's tokens (None: a row model).
        self.token_input = next((n for n in names if n in domains and not domains[n].is_mask), None)
        self.unit = "tokens" if self.token_input is not None else "rows"

    def cost(self, tensors: Mapping[str, np.ndarray]) -> int:
        if self.token_input is not None and self.token_input in tensors:
            return int(np.asarray(tensors[self.token_input]).size)
        return _rows(tensors)

    def check(self, tensors: Mapping[str, np.ndarray]) -> int:
        """The request's cost, or RequestTooLargeError before anything runs."""
        cost = self.cost(tensors)
        if self.unit == "tokens" and cost > self.limits.max_request_tokens:
            rows = _rows(tensors)
            raise RequestTooLargeError(
                f"this request is {cost} tokens ({rows} texts or rows × {cost // max(rows, 1)} padded tokens); one "
                f"request may carry at most {self.limits.max_request_tokens} (server.max_request_tokens): send fewer "
                "or shorter texts per request")
        return cost

    def chunk_rows(self, tensors: Mapping[str, np.ndarray]) -> int:
        """Rows per model call for this request (all of them when it fits one call)."""
        rows = _rows(tensors)
        if self.unit == "tokens":
            per_row = max(1, self.cost(tensors) // max(rows, 1))
            return max(1, min(rows, self.limits.chunk_tokens // per_row))
        return max(1, min(rows, self.limits.chunk_rows))

    def is_chunked(self, tensors: Mapping[str, np.ndarray]) -> bool:
        return self.chunk_rows(tensors) < _rows(tensors)

    def chunks(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The request cut along its rows into calls of at most one chunk each."""
        rows = _rows(tensors)
        size = self.chunk_rows(tensors)
        return [{k: v[start : start + size] for k, v in tensors.items()} for start in range(0, rows, size)]

    def calls(self, tensors: Mapping[str, np.ndarray]) -> int:
        return math.ceil(_rows(tensors) / self.chunk_rows(tensors)) if _rows(tensors) else 1


def _rows(tensors: Mapping[str, np.ndarray]) -> int:
    shapes = [np.shape(v) for v in tensors.values()]
    return int(shapes[0][0]) if shapes and shapes[0] else 1
