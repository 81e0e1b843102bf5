"""Privacy accounting of DP-SGD: ε of Poisson-subsampled Gaussian steps, σ for a target ε.

The maths are Google's dp-accounting (a well-kept, widely reviewed library); this module
only turns lorad's compact history — a list of :class:`RunCharge` (q, σ, steps) — into
its events and back into numbers. Everything here is a pure function so that the ledger,
the scheduler and anyone auditing a ledger file get the same answer from the same
history.

Two accountants:

- ``"rdp"``: Rényi DP (Mironov et al. 2019, sampled Gaussian mechanism) converted to
  (ε, δ) with the improved bound of Balle et al. 2020 / Canonne et al. 2020. Only the
  integer orders :data:`RDP_ORDERS` are used, so that the curve can be recomputed with
  the closed-form binomial expansion in a few lines (our tests do exactly that); the
  fractional orders dp-accounting adds by default only matter for ε ≳ 10 and sometimes
  fail to converge there.
- ``"pld"``: privacy loss distributions (Koskela et al., Doroshenko et al.), tighter
  than RDP (typically 10–15 % smaller ε) and slower.

Heterogeneous runs (different q or σ) compose: ε is that of the composition of all runs.
The neighbouring relation is add-or-remove-one example, matching Poisson sampling.

A :class:`PureCharge` is a mechanism known only to be ε₀-DP (the scheduler's
sparse-vector start test). RDP takes it as (ε₀²/2)-zCDP (Bun and Steinke 2016, Prop.
1.4: ε-DP implies it); PLD takes the pure-DP privacy loss distribution of ε₀, the
dominating pair of every ε₀-DP mechanism (dp-accounting's ``from_privacy_parameters``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

__all__ = [
    "AccountantName",
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "RunCharge",
    "PureCharge",
    "Charge",
    "epsilon",
    "calibrate_sigma",
    "load_library",
]

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "pld")

# Dense where the optimum usually lies for DP-SGD (orders 2–64), sparser above; every
# order costs O(order) terms, so the very large ones (useful only for ε ≪ 0.1) are left out.
RDP_ORDERS: tuple[int, ...] = (
    tuple(range(2, 33))
    + tuple(range(34, 65, 2))
    + tuple(range(72, 129, 8))
    + tuple(range(144, 257, 16))
    + (320, 384, 448, 512)
)

# The PLD discretisation bounds the error of ε from above (pessimistic estimate), so a
# coarser grid only costs tightness, never correctness.
_PLD_DISCRETIZATION = 1e-4
# σ above which calibration gives up: no DP-SGD configuration needs that much noise.
_MAX_SIGMA = 1e6
_MAX_BISECTIONS = 200


@dataclass(frozen=True)
class RunCharge:
    """One training run as the accountant sees it: `steps` Poisson-sampled Gaussian steps.

    q is the sampling rate (each example is in a step's batch with probability q), sigma
    the noise multiplier (noise std / clipping norm).
    """

    q: float
    sigma: float
    steps: int

    def __post_init__(self) -> None:
        _check_q(self.q)
        _check_sigma(self.sigma)
        _check_steps(self.steps)


@dataclass(frozen=True)
class PureCharge:
    """A mechanism that is ``epsilon``-DP (pure, δ = 0) and nothing more is known of it."""

    epsilon: float

    def __post_init__(self) -> None:
        if not (_is_real(self.epsilon) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon of a pure-DP charge must be a finite number > 0, got {self.epsilon!r}")


Charge = RunCharge | PureCharge


def epsilon(*, runs: Sequence[Charge], delta: float, accountant: AccountantName) -> float:
    """ε at ``delta`` of all ``runs`` composed (0.0 when nothing was trained)."""
    _check_delta(delta)
    _check_accountant(accountant)
    for run in runs:
        if not isinstance(run, (RunCharge, PureCharge)):
            raise ValueError(f"runs: every item must be a RunCharge or PureCharge, got {type(run).__name__}")
    # Runs with the same (q, σ) are one mechanism repeated: merging them is exact and keeps
    # the cost proportional to the number of distinct settings, not of runs. Order does
    # not change a composition; sorting makes the cache key canonical.
    steps: dict[tuple[float, float], int] = {}
    pure: dict[float, int] = {}
    for r in runs:
        if isinstance(r, PureCharge):
            pure[float(r.epsilon)] = pure.get(float(r.epsilon), 0) + 1
        elif r.steps > 0:
            steps[(float(r.q), float(r.sigma))] = steps.get((float(r.q), float(r.sigma)), 0) + r.steps
    if not steps and not pure:
        return 0.0
    key = tuple(sorted((q, sigma, n) for (q, sigma), n in steps.items()))
    return _epsilon_cached(key, delta, accountant, tuple(sorted(pure.items())))


def calibrate_sigma(
    *,
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: AccountantName,
    tolerance: float = 0.01,
    prior: Sequence[Charge] = (),
) -> float:
    """Smallest noise multiplier σ whose ε is at most ``target_epsilon``.

    Like Opacus' ``get_noise_multiplier``: the answer σ satisfies
    ``target_epsilon - tolerance <= ε(σ) <= target_epsilon``. ε is that of ``prior``
    (runs already charged, other mechanisms of this run) composed with the new run.
    """
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon)
            and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < target_epsilon):
        raise ValueError(
            f"tolerance must be in (0, target_epsilon={target_epsilon}), got {tolerance!r}"
        )
    _check_q(q)
    _check_steps(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate σ, got {steps}")
    _check_delta(delta)
    _check_accountant(accountant)

    def eps(sigma: float) -> float:
        return epsilon(runs=[*prior, RunCharge(q=q, sigma=sigma, steps=steps)], delta=delta,
                       accountant=accountant)

    if epsilon(runs=list(prior), delta=delta, accountant=accountant) >= target_epsilon - tolerance:
        raise ValueError(f"target_epsilon={target_epsilon} at delta={delta} is already used up by what was "
                         "charged before; no σ can fit a new run into it")

    # Invariant: ε(lo) > target (lo = 0 stands for "no noise", ε = ∞), ε(hi) <= target.
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > _MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} at delta={delta} cannot be met with "
                f"σ <= {_MAX_SIGMA:g} for q={q}, steps={steps}"
            )
    for _ in range(_MAX_BISECTIONS):
        if eps(hi) >= target_epsilon - tolerance:
            return hi
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    raise RuntimeError(
        f"σ calibration did not reach tolerance={tolerance} (ε is not continuous enough in σ "
        f"for accountant={accountant!r}); use a larger tolerance"
    )


def load_library() -> None:
    """Import dp_accounting now rather than at the first ε computation.

    Its import (about 1 s of CPU: scipy) starts helper threads (scipy's BLAS pool); done
    on a serving thread at the first ε asked for, it would stall that request. The daemon
    calls this in a background thread once it serves, when the ledger already holds runs
    (lorad.daemon.app); a fresh ledger's ε is 0 without it.
    """
    import dp_accounting  # noqa: F401


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(
    runs: tuple[tuple[float, float, int], ...], delta: float, accountant: AccountantName,
    pure: tuple[tuple[float, int], ...] = (),
) -> float:
    # Imported here: dp_accounting takes ~1.5 s to import, and the names above are read by
    # the config parser that loractl runs.
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    acct: RdpAccountant | PLDAccountant
    if accountant == "rdp":
        acct = RdpAccountant(orders=list(RDP_ORDERS))
    else:
        acct = PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    acct.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(
                        sampling_probability=q,
                        event=dp_accounting.GaussianDpEvent(noise_multiplier=sigma),
                    ),
                    count=steps,
                )
                for q, sigma, steps in runs
            ]
            + [dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(eps0**2 / 2), count=count)
               for eps0, count in pure if accountant == "rdp"]
        )
    )
    if pure and accountant == "pld":
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        total = acct._pld  # the composed PLD; dp-accounting has no event for a pure-DP mechanism
        for eps0, count in pure:
            total = total.compose(pld_lib.from_privacy_parameters(
                pld_lib.common.DifferentialPrivacyParameters(eps0, 0.0),
                value_discretization_interval=_PLD_DISCRETIZATION).self_compose(count))
        return float(total.get_epsilon_for_delta(delta))
    return float(acct.get_epsilon(delta))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_q(q: float) -> None:
    if not (_is_real(q) and 0 < q <= 1):
        raise ValueError(f"q (sampling rate) must be in (0, 1], got {q!r}")


def _check_sigma(sigma: float) -> None:
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma (noise multiplier) must be a finite number > 0, got {sigma!r}")


def _check_steps(steps: int) -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
