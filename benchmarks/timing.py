"""The one way the benchmarks time a call: warm up, then the median of many runs (wall
time), or of interleaved rounds in process CPU time (:func:`cpu_medians`). Standard library
only: the torch reference scripts import it in their own virtualenv."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["median_seconds", "best_medians", "cpu_medians", "interleaved", "Timing"]


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


def cpu_medians(calls: Mapping[str, Callable[[], object]], *, rounds: int, reps: int, seed: int = 0,
                warmup: int = 2) -> dict[str, float]:
    """Median over ``rounds`` of the mean process CPU seconds per call of each function
    (:func:`interleaved`)."""
    return {k: t.cpu for k, t in interleaved(calls, rounds=rounds, reps=reps, seed=seed, warmup=warmup).items()}


@dataclass(frozen=True)
class Timing:
    """Median seconds per call: process CPU time, and wall time next to it."""

    cpu: float
    wall: float


def interleaved(calls: Mapping[str, Callable[[], object]], *, rounds: int, reps: int, seed: int = 0,
                warmup: int = 2) -> dict[str, Timing]:
    """Median over ``rounds`` of the mean process CPU seconds (and wall seconds) per call of
    each function. Every round calls the functions in a new random order, so drift (caches,
    the other processes here, thermal) falls on all of them alike and none always runs
    right after another. CPU time is the figure to compare: a preempted call's wall time
    counts another process's work."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    order = random.Random(seed)
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                calls[name]()
            cpu[name].append((time.process_time() - c0) / reps)
            wall[name].append((time.perf_counter() - w0) / reps)
    return {k: Timing(statistics.median(cpu[k]), statistics.median(wall[k])) for k in calls}
