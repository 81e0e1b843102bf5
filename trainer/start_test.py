"""When an automatic run starts: a sparse-vector test on private counts, charged once.

Whether an adapter has enough examples to train is a function of its stored examples, and
when a run starts is public (the ledger, ``lorad_training_active``). Deciding on the exact
counts would publish them at the threshold: one example more, and the run starts. So the
scheduler asks AboveThreshold (Dwork and Roth, "The Algorithmic Foundations of
Differential Privacy", Algorithm 1 and Theorem 3.23): per adapter, one secret noisy
threshold ``T + ρ`` with ρ ~ Lap(2/ε₀), and at every check the value ``f`` (how far the
counts are above what a run needs, a sensitivity-1 query) plus fresh ν ~ Lap(4/ε₀). The
first check with ``f + ν ≥ T + ρ`` says "start" and ends the test; every "not yet" before
it is covered too. The whole test is ε₀-DP, however many checks it answers.

It is charged to the ledger when it begins (a ``query`` record, ``mechanisms:
[{"what": "start_test", "epsilon": ε₀}]``), before it answers anything: which adapters get
a test is public (configured under ``trainer.adapters``, or in the ledger), so the charge
says nothing about the data. A new test begins after a run has started, or after :data:`CHECKS` checks.

Every check is another chance for the noise to say "start" while the counts are still
short, so a test is asked at most once per ``interval_s`` (public: the policy's
``start_test_interval_s``, an hour by default) and its threshold T is a margin above zero
that keeps the chance of such a false start below 5 % over the whole test (a union bound
over its checks: :func:`margin`). At the defaults (ε₀ = 0.5, hourly) T is about 108
examples: an automatic run starts that far past what it needs. That is the price of not
publishing the counts; a manual run (``loractl train``) needs no test.

ρ is kept in ``<state_dir>/trainer/start-tests.json`` (mode 0600), so a restart continues
the test it had (charged once) instead of paying for a new one; the file is as private as
the examples.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lorad.adapters.fsutil import atomic_write_bytes

from .noise import NoiseSource

__all__ = ["StartTests", "margin", "CHECKS", "FALSE_START"]

_log = logging.getLogger(__name__)

#: Checks one test answers before a new one (charged again) begins: a year of hourly checks.
CHECKS = 8760
#: Bound on the chance that a test says "start" while the counts are short.
FALSE_START = 0.05


def margin(epsilon: float) -> float:
    """The test's threshold above zero, in examples, at ε₀: P(ρ < -(2/ε₀)·ln(1/β)) and
    P(some ν_i > (4/ε₀)·ln(CHECKS/β)) are each at most β = FALSE_START."""
    return (4.0 * math.log(CHECKS / FALSE_START) + 2.0 * math.log(1.0 / FALSE_START)) / epsilon


class StartTests:
    """One AboveThreshold test per adapter; thread-safe."""

    def __init__(self, path: Path, noise: NoiseSource, *, interval_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._noise = noise
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tests: dict[str, dict[str, float]] = self._load()
        self._asked: dict[str, float] = {}

    def check(self, adapter: str, value: float, *, epsilon: float, charge: Callable[[], object]) -> bool:
        """Whether the adapter's counts are above the threshold (privately): True ends
        the test. ``value`` is the sensitivity-1 query; ``charge`` pays for a new test
        (and may raise, e.g. PrivacyBudgetExceededError: then no test begins). Asked
        again within ``interval_s``, it answers False without looking at ``value``."""
        with self._lock:
            now = self._clock()
            if now - self._asked.get(adapter, -math.inf) < self._interval:
                return False
            test = self._tests.get(adapter)
            if test is None or test["epsilon"] != epsilon or test["checks"] >= CHECKS:
                charge()
                test = {"epsilon": epsilon, "rho": float(self._noise.laplace64(1, 2.0 / epsilon)[0]), "checks": 0}
                self._tests[adapter] = test
            self._asked[adapter] = now
            test["checks"] += 1
            nu = float(self._noise.laplace64(1, 4.0 / epsilon)[0])
            if value + nu < margin(epsilon) + test["rho"]:
                self._save()
                return False
            del self._tests[adapter]
            self._save()
            return True

    def open(self) -> list[str]:
        """Adapters with a test in progress."""
        with self._lock:
            return sorted(self._tests)

    def _load(self) -> dict[str, dict[str, float]]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Losing ρ costs a new test (charged again), never privacy.
            _log.warning("start tests %s unreadable (%s); new tests will be charged", self.path, e)
            return {}
        if not isinstance(doc, dict):
            return {}
        return {str(k): {"epsilon": float(v["epsilon"]), "rho": float(v["rho"]), "checks": float(v["checks"])}
                for k, v in doc.items() if isinstance(v, dict) and {"epsilon", "rho", "checks"} <= set(v)}

    def _save(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self._tests) + "\n").encode(), mode=0o600)
