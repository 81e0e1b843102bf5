"""Prometheus metrics of the trainer, read from the service at scrape time.

ε spent comes from the privacy ledger itself (never less than the stored versions record:
trainer/released.py) and run/step counts from the service's counters, so the metrics
cannot drift from what was charged or done. Like every metrics
holder in lorad, :func:`register_trainer_metrics` takes the registry to register on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .released import released_versions, trained_adapters, with_released

if TYPE_CHECKING:
    from .service import TrainerService

__all__ = ["RESULTS", "register_trainer_metrics"]

#: Every run result, so each series exists (at 0) from the first scrape.
RESULTS = ("accepted", "rejected", "delivered", "cancelled", "failed", "interrupted")

_log = logging.getLogger(__name__)


class _TrainerCollector(Collector):
    def __init__(self, service: TrainerService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        s = self._service
        runs = CounterMetricFamily("lorad_training_runs", "Training runs ended, by result.", labels=["result"])
        with s.stats._lock:
            counts, steps = dict(s.stats.runs), s.stats.steps
        for result in RESULTS:
            runs.add_metric([result], counts.get(result, 0))
        yield runs
        yield CounterMetricFamily("lorad_training_steps", "DP-SGD steps of ended runs (counted when a run ends).",
                                  value=steps)
        yield GaugeMetricFamily("lorad_training_available",
                                "1 when this onnxruntime has the on-device training APIs.",
                                value=1 if s.available else 0)
        status = s.scheduler.status()
        yield GaugeMetricFamily("lorad_training_active", "1 while a training run is in progress.",
                                value=1 if status["current"] else 0)
        yield GaugeMetricFamily("lorad_training_backoff_adapters",
                                "Adapters whose automatic runs wait after a failed run (GET /v2/trainer says why).",
                                value=s.scheduler.backing_off())
        spent = GaugeMetricFamily("lorad_privacy_epsilon_spent",
                                  "Privacy loss ε charged to an adapter's data (all runs composed, at its δ).",
                                  labels=["adapter"])
        budget = GaugeMetricFamily("lorad_privacy_epsilon_budget", "An adapter's configured ε budget.",
                                   labels=["adapter"])
        delta = GaugeMetricFamily("lorad_privacy_delta", "The δ at which an adapter's ε is accounted.",
                                  labels=["adapter"])
        remaining = GaugeMetricFamily("lorad_privacy_epsilon_remaining",
                                      "ε an adapter may still spend (its budget minus ε spent, at least 0).",
                                      labels=["adapter"])
        missing = GaugeMetricFamily("lorad_privacy_ledger_missing_runs",
                                    "Stored versions trained in runs the privacy ledger does not record (ledger lost "
                                    "or replaced: ε spent is then what those versions record, at least).",
                                    labels=["adapter"])
        try:
            spent_by: dict[str, float] = {}
            registry = s.adapters.registry
            for adapter in sorted(set(s.ledger.adapters()) | set(trained_adapters(registry))):
                state = with_released(s.ledger.state(adapter).to_dict(), released_versions(registry, adapter))
                spent_by[adapter] = state["epsilon_spent"]
                spent.add_metric([adapter], state["epsilon_spent"])
                missing.add_metric([adapter], len(state["ledger_missing_runs"]))
                if state["delta"] is not None:
                    delta.add_metric([adapter], state["delta"])
            # Only adapters whose existence is public: a series for a name that merely has
            # examples would publish that it has (TrainerService.public_adapters).
            for adapter in s.public_adapters():
                target = s.config.for_adapter(adapter).target_epsilon
                budget.add_metric([adapter], target)
                remaining.add_metric([adapter], max(0.0, target - spent_by.get(adapter, 0.0)))
            # No per-adapter example count, step timing or run energy: /metrics is open and
            # those are private (README, "The privacy boundary").
        except Exception as e:  # a scrape must not fail because the trainer is closing
            _log.debug("trainer metrics incomplete: %s", e)
        yield spent
        yield budget
        yield remaining
        yield delta
        yield missing

    def describe(self) -> Iterable[Metric]:
        return []


def register_trainer_metrics(registry: CollectorRegistry, service: TrainerService) -> None:
    """Export ``lorad_privacy_epsilon_spent``, ``lorad_training_runs_total`` (by result),
    ``lorad_training_steps_total`` and friends."""
    registry.register(_TrainerCollector(service))
