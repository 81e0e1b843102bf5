"""The daemon's Prometheus metrics, on a registry passed in (tests make their own).

Cache figures are read from the cache itself when scraped (it keeps the counts), so they
cannot drift from what the cache did; request figures are observed by the HTTP layer.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CacheStatsLike", "DaemonMetrics", "CONTENT_TYPE", "LATENCY_BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds; dense below 10 ms where the demo model and small encoders answer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

_log = logging.getLogger(__name__)


class CacheStatsLike(Protocol):
    """What the metrics read of :class:`adapters.cache.CacheStats`."""

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


class DaemonMetrics:
    """Every metric the daemon itself exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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

    def watch_cache(self, stats: Callable[[], CacheStatsLike]) -> None:
        """Export the cache's counts and bytes, read from ``stats()`` at each scrape."""
        self.registry.register(_CacheCollector(stats))

    def watch_batcher(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export the micro-batcher's (calls, requests), read at each scrape."""
        self.registry.register(_BatcherCollector(counts))

    def set_backend(self, requested: str, active: str) -> None:
        self.backend.labels(requested=requested, active=active).set(1)
        self.backend_degraded.set(0 if requested == active else 1)

    def on_cache_event(self, event: str, name: str) -> None:
        """``on_event`` hook of :class:`adapters.cache.AdapterCache`: counts hot swaps."""
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
