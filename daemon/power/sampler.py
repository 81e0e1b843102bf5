"""Integrates a power source into energy, per rail and per phase of work.

Each :meth:`PowerSampler.sample` (every ``interval_s`` from a thread, or called by a test
with an injected clock) reads every rail:

- a rail with a power reading adds the trapezoid ``(P_prev + P_now) / 2 × Δt`` — exact
  for power that changes linearly between samples;
- a rail with an energy counter (RAPL, already monotonic across wrap-arounds) adds its
  increase, and its power is that increase over Δt.

A rail that disappears keeps its energy (a counter never goes down) but loses its power
series until it comes back, when integration restarts from that sample: the gap is not
guessed at. That is logged once per disappearance.

Attribution to phases, by time share: over one interval, the share of the interval in
which an inference was running (busy seconds reported by the HTTP layer, capped at the
interval) goes to ``inference``, split between adapter kinds by their busy time; the rest
goes to ``training`` when a training run is active at the sample, else to ``idle``. The
device's base draw is therefore in every phase, in proportion to time: "inference" is the
energy spent while answering, not the marginal energy of the answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lorad.daemon.power.source import PowerSource, SourceError

__all__ = ["PHASES", "EnergyTotals", "PowerSampler"]

PHASES = ("idle", "inference", "training")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnergyTotals:
    """A consistent snapshot for one scrape."""

    watts: Mapping[str, float]
    total_watts: float | None
    rail_joules: Mapping[str, float]
    phase_joules: Mapping[str, float]
    inference_joules: Mapping[str, float]
    samples: int
    errors: int


class PowerSampler:
    def __init__(
        self,
        source: PowerSource,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        training_active: Callable[[], bool] = lambda: False,
        inference_busy_s: Callable[[], Mapping[str, float]] = lambda: {},
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.source = source
        self.interval_s = interval_s
        self._clock = clock
        self._training_active = training_active
        self._busy = inference_busy_s
        self._lock = threading.Lock()
        self._prev_t: float | None = None
        self._prev: dict[str, tuple[float | None, float | None]] = {}  # rail -> (watts, joules)
        self._watts: dict[str, float] = {}
        self._total_watts: float | None = None
        self._rail_j: dict[str, float] = {}
        self._phase_j = {p: 0.0 for p in PHASES}
        self._inference_j: dict[str, float] = {}
        self._prev_busy: dict[str, float] = {}
        self._samples = 0
        self._errors = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ------------------------------------------------------------------------

    def sample(self) -> None:
        """Read the source once and integrate since the previous sample."""
        now = self._clock()
        try:
            rails = self.source.rails()
        except SourceError as e:
            with self._lock:
                self._errors += 1
                self._prev_t, self._prev = None, {}  # do not integrate across the failure
                self._watts, self._total_watts = {}, None
            if not self._failing:
                _log.warning("power source %s cannot be read: %s", self.source.name, e)
                self._failing = True
            return
        if self._failing:
            _log.info("power source %s readable again", self.source.name)
            self._failing = False
        busy = dict(self._busy())
        training = self._training_active()
        with self._lock:
            dt = None if self._prev_t is None else now - self._prev_t
            interval_j: dict[str, float] = {}
            watts: dict[str, float] = {}
            for rail, r in rails.items():
                before = self._prev.get(rail)
                w = r.watts
                if r.joules is not None:
                    if before is not None and before[1] is not None and dt:
                        gained = max(0.0, r.joules - before[1])
                        interval_j[rail] = gained
                        w = gained / dt
                elif w is not None and before is not None and before[0] is not None and dt is not None:
                    interval_j[rail] = (before[0] + w) / 2.0 * dt
                if w is not None:
                    watts[rail] = w
                self._rail_j.setdefault(rail, 0.0)
            for rail in self._prev.keys() - rails.keys():
                _log.warning("power rail %s of %s disappeared; its energy stops until it is back",
                             rail, self.source.name)
            for rail, j in interval_j.items():
                self._rail_j[rail] += j
            self._prev = {rail: (r.watts, r.joules) for rail, r in rails.items()}
            self._prev_t = now
            self._watts = watts
            self._total_watts = self.source.total(watts) if watts else None
            if interval_j and dt:
                self._attribute(self.source.total(interval_j), dt, busy, training)
            self._prev_busy = busy
            self._samples += 1

    def _attribute(self, joules: float, dt: float, busy: Mapping[str, float], training: bool) -> None:
        spent = {k: max(0.0, v - self._prev_busy.get(k, 0.0)) for k, v in busy.items()}
        busy_s = sum(spent.values())
        share = min(1.0, busy_s / dt)
        inference = joules * share
        if busy_s > 0:
            for kind, s in spent.items():
                self._inference_j[kind] = self._inference_j.get(kind, 0.0) + inference * s / busy_s
        self._phase_j["inference"] += inference
        self._phase_j["training" if training else "idle"] += joules - inference

    def totals(self) -> EnergyTotals:
        with self._lock:
            return EnergyTotals(
                watts=dict(self._watts), total_watts=self._total_watts, rail_joules=dict(self._rail_j),
                phase_joules=dict(self._phase_j), inference_joules=dict(self._inference_j),
                samples=self._samples, errors=self._errors,
            )

    def total_watts(self) -> float | None:
        """The device's draw at the last sample (None before the first or while unreadable)."""
        with self._lock:
            return self._total_watts

    def training_joules(self) -> float:
        """Energy attributed to training so far (a run's cost is the difference over it)."""
        with self._lock:
            return self._phase_j["training"]

    # -- thread -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the power sampler is already running")
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="lorad-power", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a bug in one read must not end energy accounting
                _log.exception("power sample failed")

    def close(self) -> None:
        """Stop the thread; safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
