"""daemon.metrics: names follow Prometheus conventions, on a registry of the test's own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.power import NoSource


@dataclass(frozen=True)
class Stats:
    hits: int = 5
    misses: int = 2
    evictions: int = 1
    loads: int = 2
    bytes_used: int = 4096
    budget_bytes: int = 1 << 20


def _samples(m: DaemonMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metric_names_and_values() -> None:
    m = DaemonMetrics(CollectorRegistry())
    stats = [Stats()]
    m.watch_cache(lambda: stats[0])
    m.set_backend("cpu", "cpu")
    m.request_seconds.labels(endpoint="/v2/models/{model}/infer", adapter_kind="adapter").observe(0.003)
    m.request_errors.labels(endpoint="/v2/models/{model}/infer", code="400").inc()
    m.on_cache_event("swap", "mirror")
    m.on_cache_event("hit", "mirror")
    s = _samples(m)
    assert s[("lorad_adapter_cache_hits_total", ())] == 5
    assert s[("lorad_adapter_cache_misses_total", ())] == 2
    assert s[("lorad_adapter_cache_evictions_total", ())] == 1
    assert s[("lorad_adapter_cache_loads_total", ())] == 2
    assert s[("lorad_adapter_cache_bytes", ())] == 4096
    assert s[("lorad_adapter_cache_budget_bytes", ())] == 1 << 20
    assert s[("lorad_adapter_swaps_total", ())] == 1
    assert s[("lorad_request_errors_total", (("code", "400"), ("endpoint", "/v2/models/{model}/infer")))] == 1
    key = ("lorad_request_duration_seconds_count", (("adapter_kind", "adapter"), ("endpoint", "/v2/models/{model}/infer")))
    assert s[key] == 1
    assert s[("lorad_backend_info", (("active", "cpu"), ("requested", "cpu")))] == 1
    assert s[("lorad_backend_degraded", ())] == 0
    # read at scrape time: the cache's counts, never a stale copy
    stats[0] = Stats(hits=9)
    assert _samples(m)[("lorad_adapter_cache_hits_total", ())] == 9


def test_fallback_is_visible() -> None:
    m = DaemonMetrics(CollectorRegistry())
    m.set_backend("cuda", "cpu")
    s = _samples(m)
    assert s[("lorad_backend_info", (("active", "cpu"), ("requested", "cuda")))] == 1
    assert s[("lorad_backend_degraded", ())] == 1


def test_every_name_has_the_prefix_and_registries_are_independent() -> None:
    a, b = DaemonMetrics(CollectorRegistry()), DaemonMetrics(CollectorRegistry())
    a.adapter_swaps.inc()
    assert _samples(b)[("lorad_adapter_swaps_total", ())] == 0
    for fam in text_string_to_metric_families(a.render().decode()):
        # process_* and python_* are prometheus_client's standard collectors, named as
        # every exporter names them (dashboards expect those names)
        assert fam.name.startswith(("lorad_", "process_", "python_")), fam.name
        assert not fam.name.endswith("_created"), fam.name


def test_adapter_labels_are_bounded_and_never_move() -> None:
    m = DaemonMetrics(CollectorRegistry(), top_adapters=2)
    for adapter in ("a", "ghost", "b", "c", "a", None):
        m.observe_inference(adapter=adapter, kind="base" if adapter is None else "adapter", seconds=0.001,
                            ok=adapter != "ghost")
    m.observe_inference(adapter="b", kind="adapter", seconds=0.001, ok=False)
    s = _samples(m)
    got = {(dict(k[1])["adapter"], dict(k[1])["outcome"]): v for k, v in s.items() if k[0] == "lorad_adapter_requests_total"}
    assert got == {("a", "ok"): 2, ("_other", "error"): 1, ("b", "ok"): 1, ("_other", "ok"): 1, ("_base", "ok"): 1,
                   ("b", "error"): 1}
    assert m.inference_busy_seconds() == pytest.approx({"base": 0.001, "adapter": 0.006})
    with pytest.raises(ValueError, match="top_adapters"):
        DaemonMetrics(CollectorRegistry(), top_adapters=-1)


def test_build_info_and_no_power_source() -> None:
    m = DaemonMetrics(CollectorRegistry())
    m.set_build_info(version="1.2.3", ort_version="1.19.2", backend="cpu", provider="CPUExecutionProvider")
    m.watch_power(NoSource("no INA3221 hwmon device; no vcgencmd"))
    s = _samples(m)
    assert s[("lorad_build_info", (("backend", "cpu"), ("ort_version", "1.19.2"), ("provider", "CPUExecutionProvider"),
                                   ("version", "1.2.3")))] == 1
    assert s[("lorad_power_source_info", (("reason", "no INA3221 hwmon device; no vcgencmd"), ("source", "none")))] == 1
    assert not any(k[0].startswith(("lorad_power_watts", "lorad_energy")) for k in s)
