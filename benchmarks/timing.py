"""The one way the benchmarks time a call: warm up, then the median of many runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["median_seconds", "best_medians"]


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def best_medians(fns: Mapping[str, Callable[[], object]], repeats: int, *, rounds: int,
                 warmup: int = 3) -> dict[str, float]:
    """Best median (seconds) per function over ``rounds`` interleaved rounds, so that
    drift in the machine's load hits every function alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = min(best[k], median_seconds(fn, repeats, warmup=warmup))
    return best
