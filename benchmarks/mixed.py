"""Mixed-adapter bursts: N requests, each with its own adapter, arriving together.

Three ways to answer them, timed call by call in process CPU time (the batcher's thread
included), sides interleaved in random order (:func:`benchmarks.timing.cpu_medians`):

- ``per_call``: one engine call per request, each with its adapter (no batcher);
- ``batched``: the daemon's path for requests decoded in the event loop: each posted
  through the micro-batcher's window as the loop posts them, the window flushed as at the
  end of the loop's turn; the batcher runs them as one
  banked call (in this thread when the model is fast, ``inline_us``; in its runner's
  otherwise) and hands each answer to its callback;
- ``mixed_call`` / ``base_call``: the banked call alone for the N rows, and the base
  model's session over the same N rows: what mixing adapters into one batch costs.

Used by :mod:`benchmarks.serving` (the demo model) and :mod:`benchmarks.minilm`.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from benchmarks.timing import cpu_medians
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter
from lorad.adapters.memory import one_arena
from lorad.adapters.micro_batcher import make_batcher
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.config import BatchingConfig

__all__ = ["measure_bursts"]


def measure_bursts(
    engine: InferenceEngine, feeds: Callable[[int], Mapping[str, np.ndarray]],
    adapter: Callable[[int], LoraAdapter], *, n: int = 16, rounds: int = 15, inline_us: int | None = None,
) -> dict[str, float]:
    """CPU per burst of ``n`` one-row requests; ``feeds(i)`` is request i's inputs (one row),
    ``adapter(i)`` its adapter; ``inline_us`` as the daemon's ``server.batching.inline_us``
    (None: its default)."""
    if inline_us is None:
        inline_us = BatchingConfig().inline_us
    one_arena()  # as the daemon's process: the batcher's thread allocates from the main arena
    with tempfile.TemporaryDirectory() as tmp:
        registry = AdapterRegistry(Path(tmp) / "adapters")
        budget = 256 << 20
        direct = AdapterService(engine, registry, cache_budget_bytes=budget)
        batcher = make_batcher(engine, slots=n, max_wait_us=50_000, max_rows=1024, cache_budget_bytes=budget,
                               inline_us=inline_us)
        batched = AdapterService(engine, registry, cache_budget_bytes=budget, batcher=batcher)
        try:
            names = [f"user-{i}" for i in range(n)]
            for i, name in enumerate(names):
                direct.upload(name, dump_peft(adapter(i)))
                direct.pin(name)
                batched.pin(name)
            requests = [dict(feeds(i)) for i in range(n)]
            rows = {k: np.concatenate([r[k] for r in requests]) for k in requests[0]}

            answers: list[object] = []

            def collect(result: object, error: BaseException | None) -> None:
                if error is not None:
                    raise error
                answers.append(result)

            def per_call() -> None:
                answers.clear()
                for r, name in zip(requests, names, strict=True):
                    direct.post(r, name, collect)  # no batcher: answered before it returns

            turn_ends: list[Callable[[], None]] = []
            window = batcher.window(turn_ends.append)  # the event loop's call_soon, here called by hand

            def burst() -> None:
                # As the HTTP layer does: posted once decoded, each answer handed to a
                # callback (there, the event loop's); done when all are in.
                done = threading.Event()
                answers.clear()

                def deliver(result: object, error: BaseException | None) -> None:
                    collect(result, error)
                    if len(answers) == n:
                        done.set()

                for r, name in zip(requests, names, strict=True):
                    batched.post(r, name, deliver, window=window)
                turn_ends.pop()()  # the turn ends: the window is handed over
                done.wait()

            held = [batched.cache.lease(name) for name in names]
            prepared = [lease.__enter__() for lease in held]
            slots = np.array([batcher.banks.acquire(p) for p in prepared], np.int64)
            try:
                calls_before = batcher.counts()
                burst()
                calls, answered = (a - b for a, b in zip(batcher.counts(), calls_before, strict=True))
                if (calls, answered) != (1, n):
                    raise RuntimeError(f"a burst of {n} ran as {calls} calls for {answered} requests, not one banked call")
                cpu = cpu_medians({
                    "per_call": per_call,
                    "batched": burst,
                    "mixed_call": lambda: batcher.banks.run(rows, slots),
                    "base_call": lambda: engine.run(rows, None),
                }, rounds=rounds, reps=3)
            finally:
                for s in slots:
                    batcher.banks.release(int(s))
                for lease in held:
                    lease.__exit__(None, None, None)
        finally:
            batcher.close()
    return {
        "burst": n,
        "per_call_ms": round(cpu["per_call"] * 1e3, 3),
        "batched_ms": round(cpu["batched"] * 1e3, 3),
        "mixed_call_ms": round(cpu["mixed_call"] * 1e3, 3),
        "base_call_ms": round(cpu["base_call"] * 1e3, 3),
        "batcher_vs_per_call": round(cpu["per_call"] / cpu["batched"], 3),
        "mixed_vs_base_cost": round(cpu["mixed_call"] / cpu["base_call"], 3),
    }
