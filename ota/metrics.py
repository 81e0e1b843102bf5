"""Prometheus metrics of a device's OTA client, on a registry passed in.

Results are counted as the client reports them (:class:`lorad.ota.client.OtaClient`'s
``on_result``/``on_command`` observers); the connection state, the bytes fetched and the
broker's refusals are read from the transport and the reader at each scrape, so they
cannot drift from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .client import UpdateResult
from .transport import OPERATIONS

__all__ = ["OtaMetrics", "UPDATE_RESULTS", "COMMAND_RESULTS"]

#: Results of :class:`lorad.ota.client.UpdateResult` and of fleet commands.
UPDATE_RESULTS = ("installed", "up_to_date", "skipped", "deferred", "rejected", "failed", "recovered", "idle")
COMMAND_RESULTS = ("done", "failed", "rejected")


class _LiveCollector(Collector):
    def __init__(self, connected: Callable[[], bool], fetched_bytes: Callable[[], int],
                 refusals: Callable[[], Mapping[str, int]] | None) -> None:
        self._connected = connected
        self._fetched = fetched_bytes
        self._refusals = refusals

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("lorad_ota_connected",
                                "1 when the device is connected to the fleet's MQTT broker.",
                                value=1 if self._connected() else 0)
        yield CounterMetricFamily("lorad_ota_fetched_bytes",
                                  "Bytes of repository files (metadata and adapter chunks) "
                                  "received from the broker.", value=self._fetched())
        refused = CounterMetricFamily("lorad_ota_broker_refusals",
                                      "Operations the broker refused (connect: password or listener, "
                                      "publish and subscribe: its ACL or a quota), by operation.",
                                      labels=["operation"])
        counts = self._refusals() if self._refusals is not None else {}
        for op in OPERATIONS:
            refused.add_metric([op], counts.get(op, 0))
        yield refused

    def describe(self) -> Iterable[Metric]:
        return []  # describing without collecting: nothing is read before the first scrape


class OtaMetrics:
    """``lorad_ota_*``: update and command results, last update times, connection, bytes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.updates = Counter(
            "lorad_ota_updates", "OTA update outcomes by result (installed, up_to_date, skipped, "
            "deferred, rejected, failed, recovered, idle) and reason code (empty when there is none).",
            ["result", "reason"], registry=registry)
        # Every result exists at 0 from the first scrape (before any broker answered), so
        # increase() and alerts see the first failure.
        for result in UPDATE_RESULTS:
            self.updates.labels(result=result, reason="")
        self.commands = Counter(
            "lorad_ota_commands", "Fleet commands by result (done, failed, rejected) and reason code.",
            ["result", "reason"], registry=registry)
        for result in COMMAND_RESULTS:
            self.commands.labels(result=result, reason="")
        self.last_update = Gauge(
            "lorad_ota_last_update_timestamp_seconds",
            "Unix time of the last OTA update cycle that reached a result.", registry=registry)
        self.last_install = Gauge(
            "lorad_ota_last_install_timestamp_seconds",
            "Unix time of the last adapter version installed over the air.", registry=registry)

    def watch(self, *, connected: Callable[[], bool], fetched_bytes: Callable[[], int],
              refusals: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Export the connection state, bytes fetched and the broker's refusals per
        operation (:attr:`lorad.ota.transport.MqttTransport.refusals`), read at each scrape."""
        self.registry.register(_LiveCollector(connected, fetched_bytes, refusals))

    def on_result(self, r: UpdateResult) -> None:
        self.updates.labels(result=r.result, reason=r.reason or "").inc()
        self.last_update.set(r.at)
        if r.result == "installed":
            self.last_install.set(r.at)

    def on_command(self, result: Mapping[str, Any]) -> None:
        self.commands.labels(result=str(result.get("result", "")),
                             reason=str(result.get("reason") or "")).inc()
