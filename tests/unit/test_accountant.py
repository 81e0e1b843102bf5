"""The accountant: validation, monotonicity, composition, calibration, and agreement with
an independent RDP computation written here from the papers (not from dp-accounting)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorad.trainer.accountant import RDP_ORDERS, RunCharge, calibrate_sigma, epsilon

_SLACK = 1e-9  # relative; the accountant's log-sum-exps are exact to ~1e-15


def _rdp_eps(q: float, sigma: float, steps: int, delta: float = 1e-5) -> float:
    return epsilon(runs=[RunCharge(q=q, sigma=sigma, steps=steps)], delta=delta, accountant="rdp")


# --- independent implementation -------------------------------------------------------


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])


def _sampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """Mironov, Talwar, Zhang 2019 ("Rényi DP of the sampled Gaussian mechanism"), §3.3,
    integer α: A_α = Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²)); RDP = log A_α/(α-1)."""
    k = np.arange(alpha + 1)
    log_terms = _log_comb(alpha, k) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    # only k = α survives when every example is in the batch
    log_terms = log_terms + (alpha - k) * math.log1p(-q) if q < 1 else log_terms[-1:]
    top = float(np.max(log_terms))
    log_a = top + math.log(float(np.sum(np.exp(log_terms - top))))
    return log_a / (alpha - 1)


def _rdp_to_dp(orders: tuple[int, ...], rdp: list[float], delta: float) -> float:
    """Balle et al. 2020 Prop. 12 / Canonne, Kamath, Steinke 2020: for each order,
    ε = rdp + log(1 - 1/α) - (log δ + log α)/(α - 1); and ε = 0 when the KL bound
    δ ≥ sqrt(1 - exp(-rdp)) already holds."""
    best = math.inf
    for a, r in zip(orders, rdp, strict=True):
        if delta**2 + math.expm1(-r) > 0:
            return 0.0
        best = min(best, r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return max(0.0, best)


def _independent_eps(runs: list[tuple[float, float, int]], delta: float) -> float:
    total = [0.0] * len(RDP_ORDERS)
    for q, sigma, steps in runs:
        for i, a in enumerate(RDP_ORDERS):
            total[i] += steps * _sampled_gaussian_rdp(q, sigma, a)
    return _rdp_to_dp(RDP_ORDERS, total, delta)


# --- agreement ------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("steps", [1, 100, 10_000])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_rdp_agrees_with_independent_implementation(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    ours = epsilon(runs=[RunCharge(q=q, sigma=sigma, steps=steps)], delta=delta, accountant="rdp")
    assert ours == pytest.approx(_independent_eps([(q, sigma, steps)], delta), rel=1e-7, abs=1e-10)


def test_heterogeneous_runs_agree_with_independent_implementation() -> None:
    runs = [(0.01, 1.1, 300), (0.05, 2.0, 40), (1.0, 8.0, 3)]
    ours = epsilon(runs=[RunCharge(q=q, sigma=s, steps=n) for q, s, n in runs], delta=1e-6,
                   accountant="rdp")
    assert ours == pytest.approx(_independent_eps(runs, 1e-6), rel=1e-7)


def test_known_value() -> None:
    # TF Privacy's MNIST tutorial (N=60000, batch 256, σ=1.1, 60 epochs, δ=1e-5) reports
    # ε = 3.01 with the older RDP→DP conversion; the improved one can only be lower.
    eps = _rdp_eps(256 / 60000, 1.1, 60 * 60000 // 256)
    assert 2.3 < eps <= 3.01


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.01, 1.0, 200), (0.1, 2.0, 10), (0.05, 0.8, 50)])
def test_pld_is_at_most_rdp(q: float, sigma: float, steps: int) -> None:
    runs = [RunCharge(q=q, sigma=sigma, steps=steps)]
    pld = epsilon(runs=runs, delta=1e-5, accountant="pld")
    rdp = epsilon(runs=runs, delta=1e-5, accountant="rdp")
    assert 0 < pld <= rdp


# --- properties -----------------------------------------------------------------------

_q = st.floats(min_value=1e-3, max_value=1.0)
_sigma = st.floats(min_value=0.5, max_value=10.0)
_steps = st.integers(min_value=1, max_value=5000)
_factor = st.floats(min_value=1.01, max_value=3.0)


@settings(max_examples=15, deadline=None)
@given(q=_q, sigma=_sigma, steps=_steps, f=_factor)
def test_epsilon_decreases_with_sigma(q: float, sigma: float, steps: int, f: float) -> None:
    assert _rdp_eps(q, sigma * f, steps) <= _rdp_eps(q, sigma, steps) * (1 + _SLACK)


@settings(max_examples=15, deadline=None)
@given(q=_q, sigma=_sigma, steps=_steps, extra=st.integers(min_value=1, max_value=5000))
def test_epsilon_increases_with_steps(q: float, sigma: float, steps: int, extra: int) -> None:
    assert _rdp_eps(q, sigma, steps + extra) >= _rdp_eps(q, sigma, steps) * (1 - _SLACK)


@settings(max_examples=15, deadline=None)
@given(q=st.floats(min_value=1e-3, max_value=0.3), sigma=_sigma, steps=_steps, f=_factor)
def test_epsilon_increases_with_q(q: float, sigma: float, steps: int, f: float) -> None:
    assert _rdp_eps(q * f, sigma, steps) >= _rdp_eps(q, sigma, steps) * (1 - _SLACK)


@settings(max_examples=15, deadline=None)
@given(q=_q, sigma=_sigma, a=_steps, b=_steps)
def test_two_runs_compose_like_one_run(q: float, sigma: float, a: int, b: int) -> None:
    two = epsilon(runs=[RunCharge(q=q, sigma=sigma, steps=a), RunCharge(q=q, sigma=sigma, steps=b)],
                  delta=1e-5, accountant="rdp")
    assert two == pytest.approx(_rdp_eps(q, sigma, a + b), rel=1e-9, abs=1e-12)


def test_two_runs_compose_like_one_run_pld() -> None:
    two = epsilon(runs=[RunCharge(q=0.02, sigma=1.0, steps=10), RunCharge(q=0.02, sigma=1.0, steps=20)],
                  delta=1e-5, accountant="pld")
    one = epsilon(runs=[RunCharge(q=0.02, sigma=1.0, steps=30)], delta=1e-5, accountant="pld")
    assert two == pytest.approx(one, rel=1e-2)


@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(min_value=0.3, max_value=10.0),
    q=st.floats(min_value=1e-3, max_value=0.2),
    steps=st.integers(min_value=1, max_value=3000),
)
def test_calibrated_sigma_meets_target(target: float, q: float, steps: int) -> None:
    sigma = calibrate_sigma(target_epsilon=target, delta=1e-5, q=q, steps=steps,
                            accountant="rdp", tolerance=0.01)
    assert target - 0.01 <= _rdp_eps(q, sigma, steps) <= target


def test_calibrated_sigma_pld() -> None:
    sigma = calibrate_sigma(target_epsilon=2.0, delta=1e-5, q=0.05, steps=20,
                            accountant="pld", tolerance=0.1)
    eps = epsilon(runs=[RunCharge(q=0.05, sigma=sigma, steps=20)], delta=1e-5, accountant="pld")
    assert 1.9 <= eps <= 2.0


# --- edges and validation ----------------------------------------------------------------


def test_no_runs_and_zero_steps_cost_nothing() -> None:
    assert epsilon(runs=[], delta=1e-5, accountant="rdp") == 0.0
    assert epsilon(runs=[RunCharge(q=0.5, sigma=1.0, steps=0)], delta=1e-5, accountant="pld") == 0.0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"q": 0.0, "sigma": 1.0, "steps": 1}, ["q", "0.0", "(0, 1]"]),
        ({"q": 1.5, "sigma": 1.0, "steps": 1}, ["q", "1.5", "(0, 1]"]),
        ({"q": 0.1, "sigma": 0.0, "steps": 1}, ["sigma", "0.0", "> 0"]),
        ({"q": 0.1, "sigma": math.inf, "steps": 1}, ["sigma", "inf"]),
        ({"q": 0.1, "sigma": 1.0, "steps": -1}, ["steps", "-1", ">= 0"]),
        ({"q": 0.1, "sigma": 1.0, "steps": 1.5}, ["steps", "1.5"]),
    ],
)
def test_run_charge_validation_names_argument_value_and_range(
    kwargs: dict[str, float], words: list[str]
) -> None:
    with pytest.raises(ValueError) as exc:
        RunCharge(**kwargs)  # type: ignore[arg-type]
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_delta_validation(delta: float) -> None:
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        epsilon(runs=[], delta=delta, accountant="rdp")


def test_accountant_validation() -> None:
    with pytest.raises(ValueError, match="accountant must be one of"):
        epsilon(runs=[], delta=1e-5, accountant="prv")  # type: ignore[arg-type]


def test_calibration_validation() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_sigma(target_epsilon=0.0, delta=1e-5, q=0.1, steps=10, accountant="rdp")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        calibrate_sigma(target_epsilon=1.0, delta=1e-5, q=0.1, steps=0, accountant="rdp")
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_sigma(target_epsilon=1.0, delta=1e-5, q=0.1, steps=10, accountant="rdp",
                        tolerance=2.0)
