"""The daemon's Prometheus metrics, on a registry passed in (tests make their own).

Cache figures are read from the cache itself when scraped (it keeps the counts), so they
cannot drift from what the cache did; request figures are observed by the HTTP layer;
power and energy are read from the power sampler at each scrape.

Per-adapter series have bounded cardinality: the first ``top_adapters`` adapters to get
traffic after start keep their own ``adapter`` label for the life of the process (a
label never moves, so counters stay monotonic); every other adapter is counted under
``_other`` and the base model under ``_base`` (adapter names start with a letter or
digit, so neither can be an adapter's name). Every README-listed family is in
``/metrics``; ``*_created`` series are turned off (one global switch of
prometheus_client, set here once for the process).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from lorad.daemon.power import PHASES, NoSource, PowerSampler

__all__ = ["CacheStatsLike", "DaemonMetrics", "CONTENT_TYPE", "LATENCY_BUCKETS", "BASE_LABEL", "OTHER_LABEL"]

#: ``adapter`` label of requests to the base model, and of adapters beyond the top N.
BASE_LABEL, OTHER_LABEL = "_base", "_other"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds; dense below 10 ms where the demo model and small encoders answer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

_log = logging.getLogger(__name__)


class CacheStatsLike(Protocol):
    """What the metrics read of :class:`lorad.adapters.cache.CacheStats`."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    @property
    def loads(self) -> int: ...

    @property
    def bytes_used(self) -> int: ...

    @property
    def budget_bytes(self) -> int: ...


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], CacheStatsLike]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        yield CounterMetricFamily("lorad_adapter_cache_hits", "Adapter leases served from the cache.", value=s.hits)
        yield CounterMetricFamily("lorad_adapter_cache_misses", "Adapter leases that had to load from disk.", value=s.misses)
        yield CounterMetricFamily("lorad_adapter_cache_evictions", "Adapters that left the cache.", value=s.evictions)
        yield CounterMetricFamily("lorad_adapter_cache_loads", "Adapters loaded from the registry into the cache.", value=s.loads)
        yield GaugeMetricFamily("lorad_adapter_cache_bytes", "Bytes held by cached adapters (including ones still leased).", value=s.bytes_used)
        yield GaugeMetricFamily("lorad_adapter_cache_budget_bytes", "The cache's budget in bytes.", value=s.budget_bytes)

    def describe(self) -> Iterable[Metric]:
        # Describing without collecting keeps registration from calling stats() early.
        return []


class _PowerCollector(Collector):
    def __init__(self, power: PowerSampler | NoSource, limit_watts: float | None) -> None:
        self._power = power
        self._limit = limit_watts

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("lorad_power_source_info",
                                 "The power source read (value 1); source=\"none\" and the reason when there is none.",
                                 labels=["source", "reason"])
        if isinstance(self._power, NoSource):
            info.add_metric(["none", self._power.reason], 1)
            yield info
            return
        info.add_metric([self._power.source.name, ""], 1)
        yield info
        t = self._power.totals()
        watts = GaugeMetricFamily("lorad_power_watts", "Power of each rail at the last sample, watts.", labels=["rail"])
        for rail, w in sorted(t.watts.items()):
            watts.add_metric([rail], w)
        yield watts
        if t.total_watts is not None:
            yield GaugeMetricFamily("lorad_power_draw_watts",
                                    "The device's draw at the last sample (input rail or sum of rails), watts.",
                                    value=t.total_watts)
        energy = CounterMetricFamily("lorad_energy_joules",
                                     "Energy integrated by the sampler: by rail (label rail), and the device's total "
                                     "attributed to a phase (label phase: idle, inference, training).")
        for rail, j in sorted(t.rail_joules.items()):
            energy.samples.append(Sample("lorad_energy_joules_total", {"rail": rail}, j))
        for phase in PHASES:
            energy.samples.append(Sample("lorad_energy_joules_total", {"phase": phase}, t.phase_joules[phase]))
        yield energy
        per_kind = CounterMetricFamily("lorad_inference_energy_joules",
                                       "Energy attributed to inference, by adapter kind (base, adapter).",
                                       labels=["adapter_kind"])
        for kind in ("base", "adapter"):
            per_kind.add_metric([kind], t.inference_joules.get(kind, 0.0))
        yield per_kind
        yield CounterMetricFamily("lorad_power_sample_errors", "Samples at which the power source could not be read.",
                                  value=t.errors)
        if self._limit is not None:
            yield GaugeMetricFamily("lorad_power_limit_watts", "The configured power.limit_watts (alerting threshold).",
                                    value=self._limit)
class _StateCollector(Collector):
    def __init__(self, state_dir: Path, training_disabled: Callable[[], object | None]) -> None:
        self._dir = state_dir
        self._disabled = training_disabled

    def collect(self) -> Iterable[Metric]:
        try:
            free = float(shutil.disk_usage(self._dir).free)
        except OSError:
            free = float("nan")
        yield GaugeMetricFamily("lorad_state_free_bytes",
                                "Free bytes on the filesystem of the state directory (adapters, examples, ledger).",
                                value=free)
        disabled = GaugeMetricFamily("lorad_training_disabled",
                                     "1 when training is enabled but could not start, by why (disk_full, "
                                     "ledger_damaged, examples_damaged, state_unreadable); serving goes on.",
                                     labels=["reason"])
        problem = self._disabled()
        if problem is not None:
            disabled.add_metric([str(getattr(problem, "kind", "state_unreadable"))], 1)
        yield disabled

    def describe(self) -> Iterable[Metric]:
        return []


class _BatcherCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        calls, requests = self._counts()
        yield CounterMetricFamily("lorad_inference_calls", "ONNX Runtime calls made by the micro-batcher.", value=calls)
        yield CounterMetricFamily(
            "lorad_batched_requests", "Infer requests answered by the micro-batcher (requests/calls = mean batch).",
            value=requests,
        )

    def describe(self) -> Iterable[Metric]:
        return []


class _GeneratorCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        st = self._stats()
        yield GaugeMetricFamily("lorad_generations_running", "Generations running or waiting for their prefill.",
                                value=st["running"])
        yield CounterMetricFamily("lorad_generated_tokens", "Tokens generated (all generations).", value=st["tokens"])
        yield CounterMetricFamily("lorad_generation_steps", "Decode steps run; each serves every running generation "
                                  "(tokens / steps = mean batch).", value=st["steps"])
        yield GaugeMetricFamily("lorad_generation_kv_cache_reserved_bytes", "KV cache the running generations may "
                                "reach (their reservations, padded to the longest).", value=st["reserved_bytes"])
        yield GaugeMetricFamily("lorad_generation_kv_cache_budget_bytes", "generation.kv_cache_bytes.",
                                value=st["budget_bytes"])

    def describe(self) -> Iterable[Metric]:
        return []


class _FederatedCollector(Collector):
    def __init__(self, up: Callable[[], bool], restarts: Callable[[], int]) -> None:
        self._up = up
        self._restarts = restarts

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("lorad_federated_supernode_up",
                                "1 while the Flower SuperNode child (federated:) runs, 0 while it is down or not started.",
                                value=1 if self._up() else 0)
        yield CounterMetricFamily("lorad_federated_supernode_restarts",
                                  "Times the Flower SuperNode child was started again after it exited by itself.",
                                  value=self._restarts())

    def describe(self) -> Iterable[Metric]:
        return []


class _AdapterLabels:
    """Hands out at most ``top_n`` adapter labels, for good; the rest share ``_other``."""

    def __init__(self, top_n: int) -> None:
        if top_n < 0:
            raise ValueError(f"top_adapters must be >= 0, got {top_n}")
        self._top_n = top_n
        self._own: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str | None, *, may_take_a_label: bool) -> str:
        """``may_take_a_label`` only for a request that was answered: a name that does not
        exist must not take one of the labels."""
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._own:
                return adapter
            if may_take_a_label and len(self._own) < self._top_n:
                self._own.add(adapter)
                return adapter
        return OTHER_LABEL


class DaemonMetrics:
    """Every metric the daemon itself exports."""

    def __init__(self, registry: CollectorRegistry, *, top_adapters: int = 10) -> None:
        prometheus_client.disable_created_metrics()
        self.registry = registry
        # The standard process_* and python_* families, as every Python exporter has them.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._adapter_label = _AdapterLabels(top_adapters)
        self._busy_lock = threading.Lock()
        self._busy_s: dict[str, float] = {"base": 0.0, "adapter": 0.0}
        # At most top_adapters + 2 labels, two outcomes each.
        self._inference_children: dict[tuple[str, bool], tuple[Any, Any]] = {}
        self.build_info = Gauge(
            "lorad_build_info",
            "lorad's version, the onnxruntime version, the device requested (backend) and the execution provider serving (value 1).",
            ["version", "ort_version", "backend", "provider"],
            registry=registry,
        )
        self.adapter_requests = Counter(
            "lorad_adapter_requests",
            "Inference requests by adapter (top N by traffic; _other for the rest, _base for the base model) and outcome (ok, error).",
            ["adapter", "outcome"],
            registry=registry,
        )
        self.adapter_seconds = Histogram(
            "lorad_adapter_request_duration_seconds",
            "Time to answer an inference request, by adapter (top N; _other, _base).",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.reloads = Counter(
            "lorad_config_reloads",
            "SIGHUP reloads by result (ok: applied, failed: the new config was invalid and the old one stays).",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)
        self.request_seconds = Histogram(
            "lorad_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint and adapter kind (base, adapter, none).",
            ["endpoint", "adapter_kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_errors = Counter(
            "lorad_request_errors",
            "HTTP requests answered with an error status, by endpoint and status code.",
            ["endpoint", "code"],
            registry=registry,
        )
        self.model_output_errors = Counter(
            "lorad_model_output_errors",
            "Inferences whose outputs held NaN or infinity (answered 500, never sent as JSON), by adapter kind.",
            ["adapter_kind"],
            registry=registry,
        )
        self.adapter_swaps = Counter(
            "lorad_adapter_swaps",
            "Adapter versions hot-swapped into serving (uploads, installs, rollbacks).",
            registry=registry,
        )
        self.backend = Gauge(
            "lorad_backend_info",
            "Execution provider requested by the config and the one actually serving (value 1).",
            ["requested", "active"],
            registry=registry,
        )
        self.backend_degraded = Gauge(
            "lorad_backend_degraded",
            "1 when the requested execution provider is not the one serving (no silent fallback).",
            registry=registry,
        )
        self.ready = Gauge("lorad_ready", "1 when the daemon serves requests.", registry=registry)

    def set_build_info(self, *, version: str, ort_version: str, backend: str, provider: str) -> None:
        self.build_info.labels(version=version, ort_version=ort_version, backend=backend, provider=provider).set(1)

    def watch_power(self, power: PowerSampler | NoSource, *, limit_watts: float | None = None) -> None:
        """Export the sampler's power and energy (or why there is no power source)."""
        self.registry.register(_PowerCollector(power, limit_watts))

    def observe_inference(self, *, adapter: str | None, kind: str | None, seconds: float, ok: bool) -> None:
        """One inference request answered: per-adapter series and the busy time energy is split by."""
        label = self._adapter_label(adapter, may_take_a_label=ok)
        # The labelled children, looked up once per (label, outcome): labels() takes a lock
        # and builds its key on every call, a few microseconds of each request.
        children = self._inference_children.get((label, ok))
        if children is None:
            children = self._inference_children[label, ok] = (
                self.adapter_requests.labels(adapter=label, outcome="ok" if ok else "error"),
                self.adapter_seconds.labels(adapter=label))
        children[0].inc()
        children[1].observe(seconds)
        if kind in self._busy_s:
            with self._busy_lock:
                self._busy_s[kind] += seconds

    def inference_busy_seconds(self) -> dict[str, float]:
        """Seconds spent answering inference requests so far, by adapter kind (monotonic)."""
        with self._busy_lock:
            return dict(self._busy_s)

    def watch_cache(self, stats: Callable[[], CacheStatsLike]) -> None:
        """Export the cache's counts and bytes, read from ``stats()`` at each scrape."""
        self.registry.register(_CacheCollector(stats))

    def watch_state(self, state_dir: Path, *, training_disabled: Callable[[], object | None]) -> None:
        """Export the state directory's free bytes and, when the trainer could not start,
        why (``training_disabled()`` returns an object with a ``kind`` or None)."""
        self.registry.register(_StateCollector(state_dir, training_disabled))

    def watch_batcher(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export the micro-batcher's (calls, requests), read at each scrape."""
        self.registry.register(_BatcherCollector(counts))

    def watch_generator(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the generator's counts (:meth:`lorad.adapters.generation.Generator.stats`), read at each scrape."""
        self.registry.register(_GeneratorCollector(stats))

    def watch_federated(self, *, up: Callable[[], bool], restarts: Callable[[], int]) -> None:
        """Export the SuperNode child's state (``federated:``), read at each scrape: ``up()`` while
        it runs, ``restarts()`` after it exited by itself (a daemon that could not start it
        passes ``lambda: False`` and ``lambda: 0``)."""
        self.registry.register(_FederatedCollector(up, restarts))

    def set_backend(self, requested: str, active: str) -> None:
        self.backend.labels(requested=requested, active=active).set(1)
        self.backend_degraded.set(0 if requested == active else 1)

    def on_cache_event(self, event: str, name: str) -> None:
        """``on_event`` hook of :class:`lorad.adapters.cache.AdapterCache`: counts hot swaps."""
        if event == "swap":
            self.adapter_swaps.inc()

    def inference_requests(self) -> float:
        """Inference requests answered so far (the trainer's idle check reads its rate)."""
        return sum(
            sample.value
            for metric in self.request_seconds.collect()
            for sample in metric.samples
            if sample.name.endswith("_count") and sample.labels.get("endpoint", "").endswith("/infer")
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return bytes(generate_latest(self.registry))
