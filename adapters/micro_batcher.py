"""The micro-batcher: concurrent infer requests, whatever their adapters, in one ORT call.

Requests that arrive together are gathered for at most ``max_wait_us`` and up to
``max_rows`` rows, concatenated along the batch dimension, run once over the banked
graph of :mod:`lorad.adapters.lora_banks` (each row with its own adapter slot; base-model
rows use the zero slot) and split back. A lone request does not wait: the batcher waits
only while other requests are on their way (:meth:`MicroBatcher.expect`), and a batch of
one runs on the engine's single-adapter graph.

Each request keeps the lease on its adapter (taken before it is submitted) until its
batch has run, and the batch holds the bank slots it uses, so neither a hot swap nor
another batch can change what a row runs with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .engine import InferenceEngine, PreparedAdapter
from .lora_banks import AdapterBanks

__all__ = ["MicroBatcher", "make_batcher"]

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Item:
    inputs: Mapping[str, np.ndarray]
    prepared: PreparedAdapter | None
    rows: int
    signature: tuple[object, ...]
    future: Future[dict[str, np.ndarray]] = field(default_factory=Future)


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    """Requests batch together when every input agrees beyond the batch dimension."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def _split(outputs: Mapping[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut a batch's outputs back into its requests' parts.

    An output's first dimension is k rows per input row (k = 1 usually; a model that
    flattens ``[N, T, ·]`` to ``[N·T, ·]`` has k = T), batch-major as exporters lay it out.
    """
    total = sum(rows)
    parts: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] % total:
            raise RuntimeError(
                f"output {name!r} of shape {list(value.shape)} cannot be split into the batch's {total} rows;"
                " disable server.batching for this model"
            )
        k = value.shape[0] // total
        offset = 0
        for part, n in zip(parts, rows, strict=True):
            part[name] = value[offset * k : (offset + n) * k]
            offset += n
    return parts


class MicroBatcher:
    """One runner thread that gathers, runs and splits batches; see the module docstring."""

    def __init__(
        self,
        engine: InferenceEngine,
        banks: AdapterBanks,
        *,
        max_rows: int,
        max_wait_us: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine = engine
        self.banks = banks
        self.max_rows = max_rows
        self.max_wait_s = max_wait_us / 1e6
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._expected = 0
        self._closed = False
        self.batches = 0  # ORT calls made (batches of one included), for the benchmark and tests
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._loop, name="lorad-batcher", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        """(ORT calls made, requests answered) so far."""
        with self._cond:
            return self.batches, self.batched_requests

    # -- requests ------------------------------------------------------------------------

    def expect(self) -> None:
        """A request is on its way (being decoded): a batch being gathered waits for it."""
        with self._cond:
            self._expected += 1

    def unexpect(self) -> None:
        """An expected request will not be submitted (it failed before)."""
        with self._cond:
            self._expected -= 1
            self._cond.notify_all()

    def submit(self, inputs: Mapping[str, np.ndarray], prepared: PreparedAdapter | None, *,
               expected: bool = False) -> Future[dict[str, np.ndarray]]:
        """Queue one request (its lease on ``prepared`` held by the caller until the future
        is done); with ``expected``, it is the arrival of one earlier :meth:`expect`."""
        rows = {int(a.shape[0]) for a in inputs.values() if a.ndim}
        if len(rows) != 1:
            raise ValueError(f"inputs of one request must agree on the number of rows, got {sorted(rows)}")
        item = _Item(inputs, prepared, rows.pop(), _signature(inputs))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if expected:
                self._expected = max(0, self._expected - 1)
            self._queue.append(item)
            self._cond.notify_all()
        return item.future

    def close(self) -> None:
        """Stop after the queued requests; safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the runner ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._run(batch)

    def _gather(self) -> list[tuple[_Item, int]] | None:
        """The next batch with the slot of each item, or None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._clock() + self.max_wait_s
            while (
                self._expected > 0
                and self._rows_ready() < self.max_rows
                and (left := deadline - self._clock()) > 0
            ):
                self._cond.wait(timeout=left)
            return self._take()

    def _rows_ready(self) -> int:
        first = self._queue[0].signature
        return sum(i.rows for i in self._queue if i.signature == first)

    def _take(self) -> list[tuple[_Item, int]]:
        """Items of the first one's signature within max_rows that got a bank slot (lock held)."""
        first = self._queue[0].signature
        batch: list[tuple[_Item, int]] = []
        rows = 0
        kept: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            slot = None
            if item.signature == first and (not batch or rows + item.rows <= self.max_rows):
                slot = self.banks.acquire(item.prepared)
            if slot is None:  # another shape, no room, or every slot busy: next batch
                kept.append(item)
                continue
            batch.append((item, slot))
            rows += item.rows
        self._queue = kept
        if not batch:  # every slot is held by a request of this very queue: cannot happen
            raise RuntimeError("no bank slot is free although no batch is running")
        return batch

    def _run(self, batch: list[tuple[_Item, int]]) -> None:
        try:
            with self._cond:
                self.batches += 1
                self.batched_requests += len(batch)
            if len(batch) == 1:
                item = batch[0][0]
                item.future.set_result(self.engine.run(item.inputs, item.prepared))
                return
            names = list(batch[0][0].inputs)
            inputs = {n: np.concatenate([i.inputs[n] for i, _ in batch]) for n in names}
            slots = np.concatenate([np.full(i.rows, s, np.int64) for i, s in batch])
            outputs = self.banks.run(inputs, slots)
            parts = _split(outputs, [i.rows for i, _ in batch])
            for (item, _), part in zip(batch, parts, strict=True):
                item.future.set_result(part)
        except BaseException as e:  # every waiting request gets the error
            for item, _ in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
        finally:
            for _, slot in batch:
                self.banks.release(slot)


def make_batcher(
    engine: InferenceEngine, *, slots: int, max_wait_us: int, max_rows: int, cache_budget_bytes: int,
    intra_op_threads: int = 0,
) -> MicroBatcher:
    """Banks for ``engine``'s targets and a batcher over them.

    The banks hold ``slots`` adapters, fewer when that many would not fit the adapter
    cache's byte budget (the banks copy what the cache holds).
    """
    slot_bytes = sum(4 * engine.rank * (t.in_features + t.out_features) for t in engine.targets)
    slots = max(1, min(slots, cache_budget_bytes // max(slot_bytes, 1)))
    banks = AdapterBanks(
        engine.base_model, engine.targets, rank=engine.rank, slots=slots,
        providers=engine.providers, intra_op_threads=intra_op_threads,
    )
    _log.info("batching requests: up to %d rows, %d µs wait, %d adapter slots (%d bytes of banks)",
              max_rows, max_wait_us, slots, banks.nbytes)
    return MicroBatcher(engine, banks, max_rows=max_rows, max_wait_us=max_wait_us)
