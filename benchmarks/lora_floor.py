"""LoRA serving against its floor, and what a cached adapter costs in memory.

- :func:`measure_lora_overhead`: process CPU time per request, sides interleaved call by
  call in random order (:func:`benchmarks.timing.interleaved`), each batch size on its own:

  * ``base``: a plain ONNX Runtime session over the base model (the floor), the engine's
    threads and spinning;
  * ``daemon``: ``AdapterService.run`` with one adapter, as the daemon serves it at its
    defaults: after the warm-up that adapter dominates, so the merged fast path serves it
    (:mod:`lorad.adapters.merged`);
  * ``lora_graph``: the same through the LoRA session (the merged path off): what a request
    costs when adapters alternate;
  * ``no_adapter``: ``AdapterService.run`` without an adapter (the engine's base session).

- :func:`measure_adapter_memory`: RSS of ``count`` adapters loaded into the cache, per
  adapter, against the size of its ``adapter_model.safetensors``.

Used by :mod:`benchmarks.minilm` (MiniLM, seq 128) and :mod:`benchmarks.serving`.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.timing import interleaved
from lorad.adapters.config import CacheConfig
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter
from lorad.adapters.memory import trim_now
from lorad.adapters.peft_format import WEIGHTS_FILE, dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService

__all__ = ["measure_lora_overhead", "measure_adapter_memory"]

#: The daemon's default budget of the merged fast path.
MERGED_BYTES = CacheConfig().merged_bytes


def _engine(model: onnx.ModelProto, targets: Sequence[str], rank: int, threads: int, merged: bool) -> InferenceEngine:
    return InferenceEngine(model, targets=targets, rank=rank, intra_op_threads=threads, allow_spinning=threads != 1,
                           merged_bytes=MERGED_BYTES if merged else 0)


def measure_lora_overhead(
    model: onnx.ModelProto, targets: Sequence[str], rank: int, adapter: Callable[[InferenceEngine], LoraAdapter],
    feeds: Mapping[int, Mapping[str, np.ndarray]], *, threads: int = 1, rounds: int = 15,
) -> dict[str, float]:
    """Per batch size b in ``feeds`` (b → inputs): ``*_vs_base_b{b}`` ratios and CPU ms."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    base = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        services = {}
        for kind, merged in (("daemon", True), ("lora_graph", False)):
            engine = _engine(model, targets, rank, threads, merged)
            service = AdapterService(engine, AdapterRegistry(Path(tmp) / kind), cache_budget_bytes=256 << 20)
            service.upload("a0", dump_peft(adapter(engine)))
            service.load("a0")
            services[kind] = service
        daemon = services["daemon"]
        warm = next(iter(feeds.values()))
        for _ in range(5):  # the daemon engine's LoRA session opened before the RSS is read
            daemon.run(warm, "a0")
        gc.collect()
        trim_now()
        before = _rss()
        for _ in range(35):  # one adapter dominates (more than half of the last 64): it is merged
            daemon.run(warm, "a0")
        assert daemon.engine.merged is not None, "the merged fast path is off for this model"
        daemon.engine.merged.wait()
        gc.collect()
        trim_now()
        out["merged_session_rss_mb"] = round((_rss() - before) / 1e6, 1)  # what the merged path costs in memory
        out["merged_target_bytes_mb"] = round(sum(t.in_features * t.out_features * 4 for t in daemon.engine.targets) / 1e6, 1)
        out["merged_adapter"] = daemon.engine.merged.merged is not None
        for b, x in feeds.items():
            t = interleaved({
                "base": lambda: base.run(None, dict(x)),  # noqa: B023 - called before the loop moves on
                "daemon": lambda: daemon.run(x, "a0"),  # noqa: B023
                "lora_graph": lambda: services["lora_graph"].run(x, "a0"),  # noqa: B023
                "no_adapter": lambda: daemon.run(x, None),  # noqa: B023
            }, rounds=rounds, reps=3 if b == 1 else 1, seed=b)
            out[f"base_cpu_ms_b{b}"] = round(t["base"].cpu * 1e3, 3)
            out[f"base_wall_ms_b{b}"] = round(t["base"].wall * 1e3, 3)
            for side in ("daemon", "lora_graph", "no_adapter"):
                out[f"{side}_vs_base_b{b}"] = round(t[side].cpu / t["base"].cpu, 3)
                out[f"{side}_vs_base_wall_b{b}"] = round(t[side].wall / t["base"].wall, 3)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure_adapter_memory(model: onnx.ModelProto, targets: Sequence[str], rank: int,
                           adapter: Callable[[InferenceEngine, int], LoraAdapter], *, count: int = 30) -> dict[str, float]:
    """RSS per cached adapter / its safetensors file (``rss_per_cached_adapter_vs_file``)."""
    engine = _engine(model, targets, rank, 1, False)
    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp)), cache_budget_bytes=1 << 30)
        sizes = []
        for i in range(count):
            files = dump_peft(adapter(engine, i))
            sizes.append(len(files[WEIGHTS_FILE]))
            service.upload(f"a{i}", files)
            service.evict(f"a{i}")
        gc.collect()
        trim_now()
        before = _rss()
        for i in range(count):
            service.load(f"a{i}")
        gc.collect()
        trim_now()
        per_adapter = (_rss() - before) / count
    file_bytes = float(np.mean(sizes))
    return {
        "rss_per_cached_adapter_mb": round(per_adapter / 1e6, 3),
        "adapter_file_mb": round(file_bytes / 1e6, 3),
        "rss_per_cached_adapter_vs_file": round(per_adapter / file_bytes, 3),
    }
