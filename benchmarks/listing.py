"""Listing and cold-load benchmark: ``AdapterService.list_adapters`` with 10 / 100 / 1,000
stored adapters, and the cold load of one adapter next to a small and a large cache.

A real :class:`AdapterService` over the embedded demo model and a registry in a temporary
directory, filled with random rank-8 adapters through ``upload`` (as the HTTP API does).
Every figure is process CPU time per call (``time.process_time``), the median over calls
made in a random order across the stores, so that the machine's drift falls on each alike.

- ``list_adapters_ms_<n>``: one listing of ``n`` stored adapters (``n`` cached as well, so
  the cache's part of a listing is counted).
- ``load_cold_ms_cache_<k>``: ``load`` of an adapter evicted just before (untimed), while
  ``k`` other adapters are cached: reading and checking its files, preparing it, admitting
  it to the cache and describing it.
- ``open_ms_<n>``: opening the registry of ``n`` stored adapters (a daemon's start).
- ``put_ms_<n>``: storing a new version of one adapter next to ``n`` others (the registry's
  part of an upload: files, record, pointer, prune and the listing index).

    .venv/bin/python -m benchmarks.listing [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from benchmarks.load import LoadWatch
from benchmarks.serving import RANK, _random_adapter
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_TARGETS, demo_model_path

__all__ = ["measure_listing", "GOAL_LIST_MS_1000"]

#: Issue 23, item 5: listing 1,000 stored adapters costs at most this much CPU.
GOAL_LIST_MS_1000 = 20.0
SIZES = (10, 100, 1000)


def _cpu_ms(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1e3


def _filled(engine: InferenceEngine, root: Path, n: int, files: dict[str, bytes]) -> AdapterService:
    service = AdapterService(engine, AdapterRegistry(root), cache_budget_bytes=1 << 30)
    for i in range(n):
        service.upload(f"user-{i:04d}", files)
        service.load(f"user-{i:04d}")
    return service


def measure_listing(*, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """The figures above, in ms of CPU per call (medians)."""
    model = onnx.load(str(demo_model_path()))
    engine = InferenceEngine(model, targets=list(DEMO_TARGETS), rank=RANK)
    files = dump_peft(_random_adapter(engine.targets, engine.fingerprint, RANK, seed=seed))
    rounds = 7 if quick else 25
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        services = {n: _filled(engine, Path(tmp) / f"n{n}", n, files) for n in SIZES}
        fill_s = time.perf_counter() - t0
        # Let every write age past the registry's "just written, check again" window, so
        # the figures are the steady state, not the first listing after a burst of writes.
        time.sleep(1.2)
        for service in services.values():
            service.list_adapters()

        def cold(n: int) -> Callable[[], float]:
            service = services[n]

            def once() -> float:
                service.evict("user-0000")
                return _cpu_ms(lambda: service.load("user-0000"))
            return once

        def opened(n: int) -> Callable[[], float]:
            return lambda: _cpu_ms(lambda: AdapterRegistry(Path(tmp) / f"n{n}"))

        def put(n: int) -> Callable[[], float]:
            return lambda: _cpu_ms(lambda: services[n].registry.put("user-0001", files))

        def listed(n: int) -> Callable[[], float]:
            return lambda: _cpu_ms(services[n].list_adapters)

        calls: dict[str, Callable[[], float]] = {
            **{f"list_adapters_ms_{n}": listed(n) for n in SIZES},
            f"load_cold_ms_cache_{SIZES[0]}": cold(SIZES[0]),
            f"load_cold_ms_cache_{SIZES[-1]}": cold(SIZES[-1]),
            **{f"open_ms_{n}": opened(n) for n in (SIZES[0], SIZES[-1])},
            **{f"put_ms_{n}": put(n) for n in (SIZES[0], SIZES[-1])},
        }
        samples: dict[str, list[float]] = {k: [] for k in calls}
        order = random.Random(seed)
        names = list(calls)
        for _ in range(rounds):
            order.shuffle(names)
            for name in names:
                samples[name].append(calls[name]())
        assert all(len(services[n].list_adapters()) == n for n in SIZES)
    figures = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    return {
        **figures,
        "fill_s": round(fill_s, 1),
        "rounds": rounds,
        "goals": {"list_adapters_ms_1000": figures["list_adapters_ms_1000"] <= GOAL_LIST_MS_1000},
        "goal_values": {"list_adapters_ms_1000": GOAL_LIST_MS_1000},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    watch = LoadWatch()
    result = measure_listing(quick=args.quick)
    print(", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float))))
    print(json.dumps(watch.seal(result)))


if __name__ == "__main__":
    main()
