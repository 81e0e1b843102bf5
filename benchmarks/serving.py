"""Serving benchmark: LoRA overhead, hot swap, cold load, merge-and-reload, concurrency,
mixed-adapter batching (:mod:`benchmarks.concurrency`) and memory under large requests.

Measured in one run on the embedded demo model and on the reference encoder
(:mod:`benchmarks.reference_encoder`, LoRA rank 8 on all 12 linear layers). The last line
printed is one JSON object; its top-level figures are the reference encoder's, the
per-model figures are under ``models``.

    .venv/bin/python -m benchmarks.serving [--quick]
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

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from benchmarks.concurrency import measure_large_requests, measure_mixed
from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from benchmarks.timing import best_medians
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
    return {k: v * 1e6 for k, v in best_medians(fns, n, rounds=rounds, warmup=max(20, n // 20)).items()}


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

        # Overhead: the same base model without LoRA paths vs one session with an adapter active.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args()
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
        "peak_rss_mb_large_requests": memory["peak_rss_mb_large_requests"],
        "large_requests": memory,
        "models": results,
        "machine": {"cpu": platform.processor() or platform.machine(), "ort": ort.__version__, "quick": args.quick},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
