"""Serving benchmark: LoRA overhead, hot swap, cold load, merge-and-reload, concurrency,
mixed-adapter batching (:mod:`benchmarks.concurrency`) and memory under large requests.

Measured in one run on the embedded demo model and on the reference encoder
(:mod:`benchmarks.reference_encoder`, LoRA rank 8 on all 12 linear layers). The last line
printed is one JSON object; its top-level figures are the reference encoder's, the
per-model figures are under ``models``.

The serving goals of issue 23 on the demo model, in process CPU time (call by call,
sides interleaved in random order; see each module), at the top level:

- ``batcher_vs_per_call_demo_n16``: a burst of 16 one-row requests with 16 adapters, one
  engine call each / the micro-batcher (:mod:`benchmarks.mixed`); goal >= 2;
- ``http_cpu_vs_minimal_demo_c1`` / ``_c8`` / ``_c32``: a real ``lorad serve``'s CPU per
  request / a minimal aiohttp OIP server's (:mod:`benchmarks.http_cost`); goal <= 1.1;
- ``ready_cpu_vs_floor_demo``: CPU from exec to READY=1 / a bare session's open and first
  run (:mod:`benchmarks.startup`); goal <= 2;
- ``list_adapters_ms_1000``: listing 1,000 stored adapters (:mod:`benchmarks.listing`);
  goal <= 20 ms;
- ``loadavg``: the load before and after; above 1.5 per core the verdicts under ``goals``
  are withheld (:class:`benchmarks.load.LoadWatch`).

    .venv/bin/python -m benchmarks.serving [--quick] [--only-goals]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from benchmarks.concurrency import measure_large_requests, measure_mixed
from benchmarks.load import LoadWatch
from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from benchmarks.timing import interleaved
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.lora_graph import LoraTarget
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path

RANK = 8
COLD_ADAPTER_BYTES = 1 << 20

#: More models to measure in the same run: name → (build the ONNX model, LoRA target
#: patterns, make the batch-1 feeds from a numpy generator). MiniLM (branch issue-8b)
#: registers itself here at seq 128.
EXTRA_MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], list[str], Callable[[np.random.Generator], dict[str, np.ndarray]]]] = {}


def _random_adapter(targets: list[LoraTarget], fingerprint: str, rank: int, seed: int) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(
        rank=rank,
        alpha=2.0 * rank,
        base_fingerprint=fingerprint,
        weights={
            t.weight: LoraWeights(
                (rng.normal(size=(t.in_features, rank)) * 0.02).astype(np.float32),
                (rng.normal(size=(rank, t.out_features)) * 0.02).astype(np.float32),
            )
            for t in targets
        },
    )


def _interleaved_us(fns: dict[str, Callable[[], object]], n: int, rounds: int) -> dict[str, float]:
    """Process CPU µs per call: ``rounds`` × 6 rounds of ``n`` // 20 calls each, sides in a
    new random order every round (:func:`benchmarks.timing.interleaved`)."""
    timed = interleaved(fns, rounds=rounds * 6, reps=max(1, n // 20), warmup=max(20, n // 20))
    return {k: t.cpu * 1e6 for k, t in timed.items()}


def _merged_session(model: onnx.ModelProto, adapter: LoraAdapter, targets: list[LoraTarget]) -> ort.InferenceSession:
    """The naive alternative to a hot swap: merge W + s·A·B and build a new session."""
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    by_name = {t.weight: t for t in targets}
    for init in merged.graph.initializer:
        if init.name in adapter.weights:
            w = numpy_helper.to_array(init)
            lw = adapter.weights[init.name]
            delta = adapter.scale * (lw.A @ lw.B)
            init.CopyFrom(numpy_helper.from_array((w + (delta.T if by_name[init.name].transposed else delta)).astype(np.float32), init.name))
    return ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])


def measure(model: onnx.ModelProto, patterns: list[str], feeds: dict[str, np.ndarray], *, quick: bool) -> dict[str, float]:
    n = 200 if quick else 1000
    rounds = 2 if quick else 5
    engine = InferenceEngine(model, targets=patterns, rank=RANK)
    targets, fp = engine.targets, engine.fingerprint
    base = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=64 << 20)
        adapters = {f"a{i}": _random_adapter(targets, fp, RANK, seed=i) for i in range(8)}
        for name, adapter in adapters.items():
            service.upload(name, dump_peft(adapter))
            service.load(name)

        # Overhead: the same base model without LoRA paths vs the engine with an adapter
        # (after the warm-up it dominates: the merged fast path serves it), in CPU time.
        medians = _interleaved_us(
            {
                "base": lambda: base.run(None, feeds),
                "lora": lambda: service.infer(feeds, "a0"),
                "lora_same": lambda: service.infer(feeds, "a0"),
            },
            n,
            rounds,
        )
        toggle = [0]

        def alternate() -> None:
            toggle[0] ^= 1
            service.infer(feeds, "a1" if toggle[0] else "a0")

        medians.update(_interleaved_us({"alternate": alternate, "same": lambda: service.infer(feeds, "a0")}, n, rounds))

        # Cold load of a ~1 MB adapter from the registry on disk into the cache.
        per_rank = sum(4 * (t.in_features + t.out_features) for t in targets)
        cold_rank = max(1, round(COLD_ADAPTER_BYTES / per_rank))
        cold_engine = InferenceEngine(model, targets=patterns, rank=cold_rank)
        cold_service = AdapterService(cold_engine, AdapterRegistry(Path(tmp) / "cold"), cache_budget_bytes=64 << 20)
        cold = _random_adapter(targets, fp, cold_rank, seed=99)
        cold_service.upload("cold", dump_peft(cold))
        loads = []
        for _ in range(5 if quick else 20):
            cold_service.evict("cold")
            t0 = time.perf_counter()
            cold_service.load("cold")
            loads.append(time.perf_counter() - t0)

        merges = []
        for i in range(2 if quick else 5):
            t0 = time.perf_counter()
            merged = _merged_session(model, adapters[f"a{i}"], targets)
            merged.run(None, feeds)
            merges.append(time.perf_counter() - t0)

        # p99 with 4 concurrent clients cycling through 8 cached adapters.
        latencies: list[float] = []
        lock = threading.Lock()
        per_client = 150 if quick else 600

        def client(offset: int) -> None:
            mine = []
            for i in range(per_client):
                t0 = time.perf_counter()
                service.infer(feeds, f"a{(offset + i) % 8}")
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    mixed = measure_mixed(
        engine, feeds, lambda seed: _random_adapter(targets, fp, RANK, seed=seed), seconds=2.0 if quick else 8.0
    )
    swap_us = max(0.0, medians["alternate"] - medians["same"])
    merge_ms = statistics.median(merges) * 1e3
    return {
        "base_median_us": round(medians["base"], 1),
        "lora_median_us": round(min(medians["lora"], medians["lora_same"]), 1),
        "lora_overhead_ratio": round(min(medians["lora"], medians["lora_same"]) / medians["base"], 3),
        "swap_cached_us": round(swap_us, 1),
        "cold_adapter_bytes": cold.nbytes,
        "load_cold_ms": round(statistics.median(loads) * 1e3, 3),
        "merge_reload_ms": round(merge_ms, 2),
        "merge_vs_swap_ratio": round(merge_ms * 1e3 / max(swap_us, 1.0), 1),
        "p99_ms_concurrent": round(float(np.percentile(latencies, 99)) * 1e3, 3),
        **mixed,
    }


def measure_goals(*, quick: bool) -> dict[str, Any]:
    """The issue-23 figures of the demo model (see the module docstring)."""
    from benchmarks.http_cost import measure_demo
    from benchmarks.listing import measure_listing
    from benchmarks.mixed import measure_bursts
    from benchmarks.startup import measure_ready

    engine = InferenceEngine(demo_model_path(), targets=list(DEMO_TARGETS), rank=DEMO_RANK, intra_op_threads=1,
                             allow_spinning=False)
    bursts = measure_bursts(
        engine, lambda i: {"pixels": np.random.default_rng(i).random((1, 64), dtype=np.float32)},
        lambda i: _random_adapter(engine.targets, engine.fingerprint, DEMO_RANK, seed=i), rounds=10 if quick else 30)
    out: dict[str, Any] = {
        "batcher_vs_per_call_demo_n16": bursts["batcher_vs_per_call"],
        "mixed_vs_base_cost_demo_n16": bursts["mixed_vs_base_cost"],
        "bursts_demo": bursts,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out |= measure_demo(Path(tmp), rounds=2 if quick else 3, n=600 if quick else 1500)
    ready = measure_ready("demo", rounds=3 if quick else 5)
    out["ready_cpu_vs_floor_demo"] = ready["ready_cpu_vs_floor_demo"]
    out["ready_demo"] = ready
    listing = measure_listing(quick=quick)
    out["list_adapters_ms_1000"] = listing["list_adapters_ms_1000"]
    out["listing"] = listing
    out["goals"] = {
        "batcher_vs_per_call_demo_n16_ge_2": out["batcher_vs_per_call_demo_n16"] >= 2,
        **{f"http_cpu_vs_minimal_demo_c{c}_le_1.1": out[f"http_cpu_vs_minimal_demo_c{c}"] <= 1.1 for c in (1, 8, 32)},
        "ready_cpu_vs_floor_demo_le_2": out["ready_cpu_vs_floor_demo"] <= 2,
        "list_adapters_ms_1000_le_20": out["list_adapters_ms_1000"] <= 20,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--only-goals", action="store_true", help="the issue-23 goal figures only")
    args = parser.parse_args()
    watch = LoadWatch()
    goals = measure_goals(quick=args.quick)
    if args.only_goals:
        print(json.dumps(watch.seal(goals)))
        return
    rng = np.random.default_rng(0)
    demo = onnx.load(str(demo_model_path()))
    assert DEMO_RANK >= RANK
    results = {
        "demo": measure(demo, list(DEMO_TARGETS), {"pixels": rng.random((1, 64), dtype=np.float32)}, quick=args.quick),
        "reference_encoder": measure(
            build_reference_encoder(), REFERENCE_TARGETS, {"x": rng.normal(size=(1, 16, 384)).astype(np.float32)}, quick=args.quick
        ),
    }
    for name, (model, patterns, feeds) in EXTRA_MODELS.items():  # e.g. MiniLM at seq 128 (issue 8b)
        results[name] = measure(model(), patterns, feeds(rng), quick=args.quick)
    memory = measure_large_requests(rounds=2 if args.quick else 5)
    print("large requests (demo daemon): " + ", ".join(f"{k}={v}" for k, v in memory.items()))
    for name, figures in results.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    summary = {
        **results["reference_encoder"],
        **goals,
        "peak_rss_mb_large_requests": memory["peak_rss_mb_large_requests"],
        "large_requests": memory,
        "models": results,
        "machine": {"cpu": platform.processor() or platform.machine(), "ort": ort.__version__, "quick": args.quick},
    }
    print(json.dumps(watch.seal(summary)))


if __name__ == "__main__":
    main()
