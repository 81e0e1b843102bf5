"""The micro-batcher: concurrent infer requests, whatever their adapters, in one ORT call.

Requests that arrive together are gathered for at most ``max_wait_us`` and up to
``max_rows`` rows, concatenated along the batch dimension, run once and split back. A
batch whose requests mix adapters runs over the banked graph of
:mod:`lorad.adapters.lora_banks` (each row with its own adapter slot; base-model rows use
the zero slot), made at the first such batch; a batch of one adapter, or of none, runs on
the engine's own session for it (base, merged or LoRA graph). A lone request does not
wait: the batcher waits only while other requests are on their way
(:meth:`MicroBatcher.expect`). Text requests batch when their token tensors have the same
padded length: the text front end pads each to a length bucket.

One thread hand-off per request: the caller posts it with a callback, the runner thread
calls it once with the answer; the runner is woken for the first request of a batch and
when the batch is complete, not for each request.

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
from dataclasses import dataclass

import numpy as np

from .engine import InferenceEngine, PreparedAdapter
from .lora_banks import AdapterBanks

__all__ = ["MicroBatcher", "make_batcher"]

_log = logging.getLogger(__name__)


#: What a request's answer is handed to, once, in the batcher's thread: (outputs, None) or (None, error).
Deliver = Callable[[dict[str, np.ndarray] | None, BaseException | None], None]


@dataclass(eq=False, slots=True)
class _Item:
    inputs: Mapping[str, np.ndarray]
    prepared: PreparedAdapter | None
    rows: int
    signature: tuple[object, ...]
    deliver: Deliver
    done: bool = False

    def answer(self, outputs: dict[str, np.ndarray] | None, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.deliver(outputs, error)


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    """Requests batch together when every input agrees beyond the batch dimension."""
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())


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
        self._cond = threading.Condition(threading.Lock())  # not reentrant: cheaper, and never re-entered
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0  # of every signature: the runner looks closer when this reaches max_rows
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
            if self._expected <= 0:
                self._cond.notify()

    def submit(self, inputs: Mapping[str, np.ndarray], prepared: PreparedAdapter | None, *,
               expected: bool = False) -> Future[dict[str, np.ndarray]]:
        """:meth:`post` with a future for the answer."""
        future: Future[dict[str, np.ndarray]] = Future()

        def deliver(outputs: dict[str, np.ndarray] | None, error: BaseException | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outputs)  # type: ignore[arg-type]

        self.post(inputs, prepared, deliver, expected=expected)
        return future

    def post(self, inputs: Mapping[str, np.ndarray], prepared: PreparedAdapter | None, deliver: Deliver, *,
             expected: bool = False) -> None:
        """Queue one request (its lease on ``prepared`` held by the caller until ``deliver``
        has been called, once, in the batcher's thread); with ``expected``, it is the
        arrival of one earlier :meth:`expect`.

        The runner is woken only when it may act: the first request of a batch, the last
        expected one, or a full batch; a burst of N requests costs two wake-ups, not N."""
        shapes = [a.shape for a in inputs.values()]
        rows = {int(shape[0]) for shape in shapes if shape}
        if len(rows) != 1:
            raise ValueError(f"inputs of one request must agree on the number of rows, got {sorted(rows)}")
        item = _Item(inputs, prepared, rows.pop(), _signature(inputs), deliver)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if expected:
                self._expected = max(0, self._expected - 1)
            first = not self._queue
            self._queue.append(item)
            self._queued_rows += item.rows
            if first or self._expected == 0 or self._queued_rows >= self.max_rows:
                self._cond.notify()

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
                and not self._closed
                and self._rows_ready() < self.max_rows
                and (left := deadline - self._clock()) > 0
            ):
                self._cond.wait(timeout=left)
            return self._take()

    def _rows_ready(self) -> int:
        first = self._queue[0].signature
        return sum(i.rows for i in self._queue if i.signature == first)

    def _take(self) -> list[tuple[_Item, int]]:
        """Items of the first one's signature within max_rows, with the bank slot of each
        (lock held). A batch whose requests all run with one adapter, or none, takes no
        slot: it runs on the engine's own sessions (the base model's, the merged one or the
        LoRA graph), and the banks are not even made until requests mix."""
        first = self._queue[0].signature
        chosen: list[_Item] = []
        rows = 0
        kept: deque[_Item] = deque()
        for item in self._queue:
            if item.signature == first and (not chosen or rows + item.rows <= self.max_rows):
                chosen.append(item)
                rows += item.rows
            else:  # another shape, or no room: next batch
                kept.append(item)
        batch: list[tuple[_Item, int]] = []
        if all(i.prepared is chosen[0].prepared for i in chosen):  # one adapter (or none): the engine's own graph
            batch.extend((i, 0) for i in chosen)
        else:
            for item, slot in zip(chosen, self.banks.acquire_all([i.prepared for i in chosen]), strict=True):
                if slot is None:  # more adapters than slots: next batch
                    kept.append(item)
                    rows -= item.rows
                else:
                    batch.append((item, slot))
        self._queue = kept
        self._queued_rows -= rows
        return batch

    def _run(self, batch: list[tuple[_Item, int]]) -> None:
        try:
            with self._cond:
                self.batches += 1
                self.batched_requests += len(batch)
            if len(batch) == 1:
                item = batch[0][0]
                item.answer(self.engine.run(item.inputs, item.prepared))
                return
            first = batch[0][0].inputs
            inputs = {n: np.concatenate([i.inputs[n] for i, _ in batch]) for n in first}
            if all(slot == 0 for _, slot in batch):  # one adapter or none (see _take)
                outputs = self.engine.run(inputs, batch[0][0].prepared)
            else:
                slots = np.repeat(np.array([s for _, s in batch], np.int64), [i.rows for i, _ in batch])
                outputs = self.banks.run(inputs, slots)
            for (item, _), part in zip(batch, _split(outputs, [i.rows for i, _ in batch]), strict=True):
                item.answer(part)
        except BaseException as e:  # every waiting request gets the error
            for item, _ in batch:
                item.answer(None, e)
            if not isinstance(e, Exception):
                raise
        finally:
            self.banks.release(*(slot for _, slot in batch))


def make_batcher(
    engine: InferenceEngine, *, slots: int, max_wait_us: int, max_rows: int, cache_budget_bytes: int,
) -> MicroBatcher:
    """Banks for ``engine``'s targets and a batcher over them.

    The banks hold ``slots`` adapters, fewer when that many would not fit the adapter
    cache's byte budget (the banks copy what the cache holds); their session runs as the
    engine's (threads, spinning, shared tables).
    """
    slot_bytes = sum(4 * engine.rank * (t.in_features + t.out_features) for t in engine.targets)
    slots = max(1, min(slots, cache_budget_bytes // max(slot_bytes, 1)))
    # Lazy: the banks and their session cost memory and start-up time (MiniLM: about 160 MB,
    # 0.8 s) that only requests that mix adapters need.
    banks = AdapterBanks(
        engine.base_model, engine.targets, rank=engine.rank, slots=slots,
        providers=engine.providers, options=engine.session_options(), lazy=True,
    )
    _log.info("batching requests: up to %d rows, %d µs wait, %d adapter slots (%d bytes of banks)",
              max_rows, max_wait_us, slots, banks.nbytes)
    return MicroBatcher(engine, banks, max_rows=max_rows, max_wait_us=max_wait_us)
