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

One thread hand-off per request at most: the caller posts it with a callback, the runner
thread calls it once with the answer; the runner is woken for the first request of a batch
and when the batch is complete, not for each request. The event loop posts through a
:class:`PostWindow` instead: the requests decoded in one turn of the loop are handed over
together at its end, and when recent batches ran faster than ``inline_us`` and the runner
is idle they run there and then, with no hand-off at all (a small model's call costs less
than waking a thread; a minimal server runs it in the loop too).

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

__all__ = ["MicroBatcher", "PostWindow", "make_batcher"]

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
        inline_us: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine = engine
        self.banks = banks
        self.max_rows = max_rows
        self.max_wait_s = max_wait_us / 1e6
        self.inline_s = inline_us / 1e6
        self._clock = clock
        self._row_s: float | None = None  # wall seconds per row of recent batches (moving average)
        self._running = 0  # batches being run now, by the runner or a window's thread
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
        item = _item(inputs, prepared, deliver)
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

    def window(self, schedule: Callable[[Callable[[], None]], object]) -> PostWindow:
        """A :class:`PostWindow` for one thread; ``schedule(flush)`` has ``flush`` called once
        that thread's current turn ends (the event loop's ``call_soon``)."""
        return PostWindow(self, schedule)

    def _hand(self, items: list[_Item], expected: int) -> None:
        """A window's requests: run now in this thread when the runner is idle and they would
        run in ``inline_s`` (by the recent batches' time per row), and their banks are open
        if they mix adapters; else queued for the runner with one wake-up."""
        rows = sum(i.rows for i in items)
        with self._cond:
            closed = self._closed
            if not closed:
                self._expected = max(0, self._expected - expected)
                if not self._runs_here(items, rows):
                    self._queue.extend(items)
                    self._queued_rows += rows
                    self._cond.notify()
                    return
        if closed:  # answered outside the lock: a callback may post again
            error = RuntimeError("the batcher is closed")
            for item in items:
                item.answer(None, error)
            return
        pending = deque(items)
        while pending:
            with self._cond:
                batch, pending, _ = self._choose(pending)
                if not batch:  # the runner's batch holds every bank slot: the rest is its to run
                    self._queue.extend(pending)
                    self._queued_rows += sum(i.rows for i in pending)
                    self._cond.notify()
                    return
                self._running += 1
            self._run(batch)

    def _runs_here(self, items: list[_Item], rows: int) -> bool:
        """Whether a window's requests run in its thread (lock held): see :meth:`_hand`."""
        return (
            not self._queue and not self._running and self._row_s is not None
            and self._row_s * rows <= self.inline_s
            and (self.banks.opened or all(i.prepared is items[0].prepared for i in items))
        )

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
            while not (batch := self._take()):  # a window's inline batch holds every bank slot
                self._cond.wait()
            return batch

    def _rows_ready(self) -> int:
        first = self._queue[0].signature
        return sum(i.rows for i in self._queue if i.signature == first)

    def _take(self) -> list[tuple[_Item, int]]:
        """The queue's next batch (lock held); see :meth:`_choose`."""
        batch, self._queue, rows = self._choose(self._queue)
        self._queued_rows -= rows
        self._running += bool(batch)
        return batch

    def _choose(self, queue: deque[_Item]) -> tuple[list[tuple[_Item, int]], deque[_Item], int]:
        """Items of the first one's signature within max_rows, with the bank slot of each,
        the items left and the rows taken (lock held). A batch whose requests all run with
        one adapter, or none, takes no slot: it runs on the engine's own sessions (the base
        model's, the merged one or the LoRA graph), and the banks are not even made until
        requests mix."""
        first = queue[0].signature
        chosen: list[_Item] = []
        rows = 0
        kept: deque[_Item] = deque()
        for item in queue:
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
        return batch, kept, rows

    def _run(self, batch: list[tuple[_Item, int]]) -> None:
        """Run one batch (counted in ``_running`` by whoever chose it) and answer its requests."""
        start = time.perf_counter()
        try:
            with self._cond:
                self.batches += 1
                self.batched_requests += len(batch)
            if len(batch) == 1:
                item = batch[0][0]
                outputs = self.engine.run(item.inputs, item.prepared)
                self._timed(start, item.rows)
                item.answer(outputs)
                return
            first = batch[0][0].inputs
            inputs = {n: np.concatenate([i.inputs[n] for i, _ in batch]) for n in first}
            counts = [i.rows for i, _ in batch]
            if all(slot == 0 for _, slot in batch):  # one adapter or none (see _choose)
                outputs = self.engine.run(inputs, batch[0][0].prepared)
            else:
                outputs = self.banks.run(inputs, np.repeat(np.array([s for _, s in batch], np.int64), counts))
            self._timed(start, sum(counts))
            for (item, _), part in zip(batch, _split(outputs, counts), strict=True):
                item.answer(part)
        except BaseException as e:  # every waiting request gets the error
            for item, _ in batch:
                item.answer(None, e)
            if not isinstance(e, Exception):
                raise
        finally:
            self.banks.release(*(slot for _, slot in batch))
            with self._cond:
                self._running -= 1
                if self._queue:  # a batch that found no free slot waits for these
                    self._cond.notify()

    def _timed(self, start: float, rows: int) -> None:
        """Fold a batch's time per row into the moving average that decides what runs inline
        (unlocked: the runner and a window's thread may both write it; either value will do)."""
        per_row = (time.perf_counter() - start) / max(rows, 1)
        self._row_s = per_row if self._row_s is None else 0.8 * self._row_s + 0.2 * per_row


class PostWindow:
    """Requests posted from one thread (the event loop's) during one turn of it, handed to
    the batcher together when the turn ends: one lock and at most one wake-up for all of
    them, and no hand-off at all when they run inline (:meth:`MicroBatcher._hand`).

    Not thread-safe: one window per posting thread.
    """

    def __init__(self, batcher: MicroBatcher, schedule: Callable[[Callable[[], None]], object]) -> None:
        self._batcher = batcher
        self._schedule = schedule
        self._items: list[_Item] = []
        self._expected = 0

    def post(self, inputs: Mapping[str, np.ndarray], prepared: PreparedAdapter | None, deliver: Deliver, *,
             expected: bool = False) -> None:
        """As :meth:`MicroBatcher.post`; ``deliver`` may be called in this thread, in :meth:`flush`."""
        self._items.append(_item(inputs, prepared, deliver))
        self._expected += expected
        if len(self._items) == 1:
            self._schedule(self.flush)

    def flush(self) -> None:
        """Hand what was posted since the last flush to the batcher."""
        items, self._items = self._items, []
        expected, self._expected = self._expected, 0
        if items:
            self._batcher._hand(items, expected)


def _item(inputs: Mapping[str, np.ndarray], prepared: PreparedAdapter | None, deliver: Deliver) -> _Item:
    """A queued request; requests batch together when every input agrees beyond the batch
    dimension (their signature). One pass: this runs for every request."""
    rows = -1
    signature = []
    for name, a in inputs.items():
        shape = a.shape
        if shape and shape[0] != rows:
            if rows >= 0:
                raise ValueError("inputs of one request must agree on the number of rows, got "
                                 f"{sorted({v.shape[0] for v in inputs.values() if v.shape})}")
            rows = shape[0]
        signature.append((name, a.dtype, shape[1:]))
    if rows < 0:
        raise ValueError("a request needs an input with a batch dimension, got only scalars")
    return _Item(inputs, prepared, rows, tuple(signature), deliver)


def make_batcher(
    engine: InferenceEngine, *, slots: int, max_wait_us: int, max_rows: int, cache_budget_bytes: int,
    inline_us: int = 0,
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
    return MicroBatcher(engine, banks, max_rows=max_rows, max_wait_us=max_wait_us, inline_us=inline_us)
