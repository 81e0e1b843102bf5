"""A privacy audit of an adapter's DP-SGD configuration in one training run.

The canaries
    m canaries, each a random unit direction ``c_i`` in the space of the P trainable LoRA
    parameters, each inserted independently with probability ½ (the others are never
    inserted: the null). The directions have disjoint random supports (a random
    permutation of the coordinates cut into m blocks, Gaussian weights on each), so they
    are exactly orthogonal and m <= P: with P only a few thousand, independent dense
    directions are not orthogonal enough — each inserted canary recurs in about q·T
    steps, so their overlaps add noise of about √(m_in/P)·q·T to every score and cap the
    estimate at μ ≈ √(P/m_in) (measured on the demo with the noise removed: μ 2.9 for 514
    inserted canaries), too low to flag ε = 8 once more than about P/3 are inserted.

    An inserted canary is an example whose per-example gradient is ``4·C·c_i``: Poisson
    sampled with rate q in every step like every example, its gradient row joins the
    batch's per-example gradient rows *before the clip* (the audit's variant of the step
    graph, :func:`lorad.trainer.portable_graph.with_canary_rows`), so the training graph's
    own nodes clip it to C, sum it with the examples and noise it.
    Its raw norm is 4·C so that a clip that does not clip lets four times as much through.
    The run trains once with the adapter's configuration — the (q, σ, C, steps) of its
    last completed run, else the plan its config gives — and its optimiser and learning
    rate, on a copy of its training split in memory: nothing is installed, served, stored
    or charged to the adapter's ledger.

What is observed, and the score
    What DP-SGD releases in step t is the noised clipped sum ``g_t`` (the parameters are a
    function of these, and the accountant's ε covers the release of all of them). DP's
    adversary knows every other example (and, Poisson sampling being independent per
    example, may know which of them a step sampled without weakening the guarantee), so
    it can compute the examples' clipped sum ``s_t`` at the step's parameters; the graph
    outputs it, with the clip factors of the same nodes. The residual ``g_t - s_t`` is the
    noise plus the clipped gradients of the canaries sampled in that step. The score of
    canary i is ``<Σ_t (g_t - s_t), c_i> / C``: about q·T for an inserted canary (T steps),
    0 for a null one, each with noise of standard deviation σ·√T.

    Why not the trained parameters' change θ_0 - θ_T, the statistic of Andrew et al.: the
    examples' gradients add up coherently over the steps, and their projection on a
    random direction (about ‖Σ_t s_t‖/√P) competes with the canaries' q·T·C, and the
    optimiser reshapes it. Measured on the demo's ε = 8 configuration with the noise
    removed: with SGD (learning rate 1) that statistic estimates μ 0.97, ε 4.2 (lower
    bound 3.6), i.e. "consistent" with 7.90; with AdamW it happens to flag the run (μ 6.8)
    because its per-coordinate scaling evens out the examples' drift. The residual does
    not depend on the optimiser or on the examples.

The estimate (the verdict)
    Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
    Estimation for Federated Learning" (ICLR 2024): fit Gaussians to the inserted and the
    null scores, ``μ = (mean_in - mean_null) / sd_null``, read it as μ-GDP and convert it
    to ε at the run's δ with ``δ(ε) = Φ(-ε/μ + μ/2) - e^ε·Φ(-ε/μ - μ/2)`` (Dong, Roth, Su
    2022). ``epsilon_estimate_lower`` is that ε at a one-sided lower confidence bound of μ
    (normal approximation of the two sample means and of sd_null). The run is
    ``consistent`` unless ``epsilon_estimate_lower`` (or the rigorous bound below)
    exceeds the accounted ε.

    This is an *estimate*, not a bound: it assumes the scores are Gaussian (they are a
    Binomial(T, q) count of insertions plus Gaussian noise, close to Gaussian at these
    step counts) and it measures this attack only, so the true ε may be higher. For
    lorad's default configuration at ε = 8 on 400 examples (q 0.16, σ 1.66, 188 steps) a
    correct run expects μ ≈ q·√T/σ = 1.32, ε ≈ 6.1, against ε 7.90 accounted (RDP; PLD
    gives 7.16); ε 7.90 takes μ ≈ 1.65. Over 12 seeds with 1000 canaries μ was 1.33 ± 0.09
    (ε 5.2–7.2, lower bounds 4.6–6.4). With the noise removed the null scores have no
    spread left (only float32 rounding): μ and ε are unbounded (null in JSON); with
    clipping off μ is about four times the correct one (ε ≈ 34): both are violations. A
    correct run whose accounted ε is tight is flagged with probability about
    1 - confidence; the accountant's slack (RDP over the exact ε) makes that rarer.

The rigorous bound (an extra figure)
    Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
    2023): guess "in" for the r/2 highest scores and "out" for the r/2 lowest (r = m/4),
    count the v correct guesses; if training is (ε, δ)-DP, v is dominated by
    Binomial(r, e^ε/(1 + e^ε)) up to a δ term (their Theorem 3.1 / Algorithm 2,
    :func:`p_value`), so every ε with a p-value below 1 - confidence is refuted:
    ``epsilon_lower_bound`` holds without assumptions, but it cannot exceed what r
    correct guesses refute (about 4.4 for 1000 canaries), so it can never flag ε = 8.

The backend
    The audit always runs the portable backend (the default; ort-training is
    deprecated), whatever ``trainer.backend`` says: only its graph can take canary rows
    before the clip. The audited numbers (q, σ, C, steps, optimiser) are the same.

Test-only faults
    ``noise_multiplier`` sets the noise actually added while the configuration's σ is
    still the one accounted (a run with its noise silently removed); ``clip_norm`` sets
    the clip the graph applies while the noise stays σ·C of the configuration (a huge
    one switches clipping off). Both are refused unless the noise source is the seeded
    test one.

The result is a function of the adapter's data, so it is returned only to
authenticated callers (like the exact example count) and never published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .accountant import RunCharge, epsilon
from .batching import collate
from .config import AdapterTrainingConfig
from .dp_step import DPSettings
from .errors import BadTrainingDataError

__all__ = ["AuditResult", "METHOD", "p_value", "epsilon_lower_bound", "gaussian_mu", "gdp_epsilon",
           "audit_adapter"]

METHOD = ("one-shot Gaussian estimate (Andrew et al. 2024) from random-direction gradient canaries clipped with "
          "the examples; rigorous lower bound: one-run audit (Steinke et al. 2023)")
#: Share of the canaries guessed on for the rigorous bound (half "in", half "out").
_GUESS_FRACTION = 0.25
#: A canary's raw gradient norm, in clip norms.
_CANARY_NORM = 4.0
#: Most bytes of canary gradient rows one step may feed (their expected number × P × 4).
_MAX_ROW_BYTES = 256 << 20


@dataclass(frozen=True)
class AuditResult:
    adapter: str
    method: str
    canaries: int
    #: Canaries inserted (each with probability ½); the other ones are the null.
    inserted: int
    confidence: float
    #: μ of the Gaussian fit (μ-GDP), and its one-sided lower confidence bound.
    mu_estimate: float
    mu_estimate_lower: float
    #: ε of μ-GDP at ``delta`` for those two: the estimate, and the verdict's figure.
    epsilon_estimate: float
    epsilon_estimate_lower: float
    #: The rigorous one-run bound (Steinke et al.): correct of guesses, and the ε refuted
    #: at ``confidence`` (0.0 when nothing can be refuted).
    guesses: int
    correct: int
    epsilon_lower_bound: float
    #: ε the accountant gives the audited configuration at ``delta``.
    epsilon_accounted: float
    delta: float
    q: float
    sigma: float
    clip_norm: float
    steps: int
    #: Where the configuration came from: "run <id>" (the ledger) or "config".
    configuration: str
    #: What the run applied: σ and C above unless a test-only fault changed them.
    noise_multiplier_applied: float
    clip_norm_applied: float

    @property
    def consistent(self) -> bool:
        """Whether the audit found nothing beyond the accounted ε."""
        return max(self.epsilon_estimate_lower, self.epsilon_lower_bound) <= self.epsilon_accounted

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = {**asdict(self), "consistent": self.consistent}
        # An unbounded ε (σ = 0 accounted, or a null with no spread) is null in JSON.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in doc.items()}


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the training were (ε, δ)-DP (Steinke et al.
    2023, Algorithm 2: the binomial tail plus the δ term over m canaries)."""
    from scipy.stats import binom  # type: ignore[import-untyped]  # scipy comes with dp-accounting

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, p))
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, p))
        if below > i * alpha:
            alpha = below / i
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest ε refuted at ``confidence`` by v correct of r guesses (0.0: none)."""
    threshold = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > threshold:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= threshold and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= threshold:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_mu(inserted: np.ndarray, null: np.ndarray, *, confidence: float = 0.95) -> tuple[float, float]:
    """``(μ, μ_lower)``: μ = (mean_in - mean_null)/sd_null of two samples of scores, and
    its one-sided lower confidence bound at ``confidence`` (normal approximation:
    var μ ≈ (var_in/m_in + var_null/m_null)/var_null + μ²/(2(m_null - 1))). Both are
    clamped at 0; fewer than two scores on a side estimate nothing (0, 0)."""
    from scipy.stats import norm

    a, b = np.asarray(inserted, np.float64), np.asarray(null, np.float64)
    if a.size < 2 or b.size < 2:
        return 0.0, 0.0
    diff = float(a.mean() - b.mean())
    sd_null = float(b.std(ddof=1))
    if sd_null == 0.0:
        return (math.inf, math.inf) if diff > 0 else (0.0, 0.0)
    mu = diff / sd_null
    se = math.sqrt((float(a.var(ddof=1)) / a.size + sd_null**2 / b.size) / sd_null**2 + mu**2 / (2 * (b.size - 1)))
    lower = mu - float(norm.ppf(confidence)) * se
    return max(mu, 0.0), max(lower, 0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP has ``delta``: the root of
    δ(ε) = Φ(-ε/μ + μ/2) - e^ε·Φ(-ε/μ - μ/2) (Dong, Roth, Su 2022, Corollary 2.13);
    0.0 when δ(0) <= delta already, inf for an infinite μ."""
    from scipy.optimize import brentq  # type: ignore[import-untyped]
    from scipy.stats import norm

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not mu > 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + float(norm.logcdf(-eps / mu - mu / 2)))) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > 1e7:
            return math.inf
    return float(brentq(excess, 0.0, hi, xtol=1e-9))


class _Directions:
    """m random unit vectors in R^P on disjoint random supports (so exactly orthogonal):
    a random permutation of the coordinates cut into m blocks, Gaussian weights on each
    block, normalised. Held as O(P) numbers whatever m is."""

    def __init__(self, m: int, size: int, rng: np.random.Generator) -> None:
        blocks = np.array_split(rng.permutation(size), m)
        self.owner = np.empty(size, np.int64)
        for i, block in enumerate(blocks):
            self.owner[block] = i
        weights = rng.standard_normal(size)
        weights /= np.sqrt(np.bincount(self.owner, weights=weights**2, minlength=m))[self.owner]
        self.weights = weights
        self.blocks = blocks
        self.m, self.size = m, size

    def project(self, v: np.ndarray) -> np.ndarray:
        """<v, c_i> for every direction i."""
        return np.bincount(self.owner, weights=self.weights * v, minlength=self.m)

    def rows(self, which: np.ndarray, scale: float) -> np.ndarray:
        """scale·c_i for each i in ``which``, as float32 rows [len(which), P]."""
        out = np.zeros((len(which), self.size), np.float32)
        for row, i in enumerate(which):
            block = self.blocks[i]
            out[row, block] = scale * self.weights[block]
        return out


class _Canaries:
    """The audit's :class:`lorad.trainer.portable.CanaryFeed`: Poisson samples the
    inserted canaries each step and adds up the residuals g_t - s_t."""

    def __init__(self, directions: _Directions, inserted: np.ndarray, *, norm: float, q: float,
                 rng: np.random.Generator) -> None:
        self._directions, self._inserted, self._norm, self._q, self._rng = directions, inserted, norm, q, rng
        self.residual = np.zeros(directions.size, np.float64)

    def rows(self) -> np.ndarray:
        sampled = self._inserted[self._rng.random(len(self._inserted)) < self._q]
        return self._directions.rows(sampled, self._norm)

    def observe(self, released: np.ndarray, examples: np.ndarray) -> None:
        self.residual += released - examples


def audit_adapter(
    env: Any, adapter: str, config: AdapterTrainingConfig, *, canaries: int = 1000, confidence: float = 0.95,
    seed: int | None = None, noise_multiplier: float | None = None, clip_norm: float | None = None,
) -> AuditResult:
    """Run the audit of ``adapter`` (``env``: a :class:`lorad.trainer.run.TrainerEnv`); see
    the module docstring. ``noise_multiplier`` and ``clip_norm`` are its test-only faults."""
    from .model_setup import pad_length, preflight, training_layouts
    from .portable import PortableStepper

    if canaries < 8:
        raise ValueError(f"canaries must be >= 8, got {canaries}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if (noise_multiplier is not None or clip_norm is not None) and getattr(env.noise, "secure", False):
        raise ValueError("overriding σ or C is a test-only setting (trainer.testing with seeded noise)")
    if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    train_ids, _ = env.store.split(adapter, config.holdout_fraction, config.split_seed)
    data = env.store.load(train_ids, skip_missing=True)
    if not data:
        raise BadTrainingDataError(f"adapter {adapter!r} has no training examples to audit with; add examples")
    q, sigma, c, steps, delta, source = _configuration(env, adapter, config, len(data))
    applied_sigma = sigma if noise_multiplier is None else noise_multiplier
    applied_clip = c if clip_norm is None else clip_norm
    service = env.service
    artifacts = preflight(service, config, cache_dir=env.state_dir / "artifacts", backend="portable")
    size = artifacts.noise_size
    if canaries > size:
        raise ValueError(f"{canaries} canaries need as many trainable LoRA parameters (their directions are "
                         f"orthogonal); the adapter has {size}; use at most {size} canaries")
    most = int(_MAX_ROW_BYTES / (4 * size * max(q, 1e-9) * 0.5))
    if canaries > most:
        raise ValueError(f"{canaries} canaries would feed about {canaries * q / 2:.0f} gradient rows of {size} "
                         f"parameters per step; use at most {most} canaries")
    layouts = training_layouts(artifacts)
    rng = np.random.default_rng(seed)
    directions = _Directions(canaries, size, rng)
    included = rng.random(canaries) < 0.5
    feed = _Canaries(directions, np.flatnonzero(included), norm=_CANARY_NORM * c, q=q, rng=rng)
    # The noise std is σ·C of the configuration whatever C the graph applies.
    fed_sigma = applied_sigma if applied_clip == c else applied_sigma * c / applied_clip
    dp = DPSettings(noise_multiplier=fed_sigma, clip_norm=applied_clip,
                    expected_batch_size=max(q * (len(data) + int(included.sum())), 1e-9))
    stepper = PortableStepper(artifacts, learning_rate=config.learning_rate, dp=dp, noise=env.noise,
                              device=env.device, intra_op_threads=env.intra_op_threads, canaries=feed)
    try:
        pad_to = pad_length(service, config)
        for _ in range(steps):
            picked = [data[i] for i in np.flatnonzero(rng.random(len(data)) < q)]
            batch, _ = collate(picked, inputs_layout=layouts[:-1], label_layout=layouts[-1], pad_to=pad_to)
            stepper.step(batch)
    finally:
        stepper.close()
    scores = directions.project(feed.residual) / c
    mu, mu_lower = gaussian_mu(scores[included], scores[~included], confidence=confidence)
    guesses = max(2, int(canaries * _GUESS_FRACTION) // 2 * 2)
    # Ties are broken at random so that equal scores carry no information.
    order = np.lexsort((rng.random(canaries), scores))
    guessed_out, guessed_in = order[: guesses // 2], order[canaries - guesses // 2:]
    correct = int(np.sum(included[guessed_in]) + np.sum(~included[guessed_out]))
    accounted = (math.inf if sigma == 0 else
                 epsilon(runs=[RunCharge(q=q, sigma=sigma, steps=steps)], delta=delta, accountant=config.accountant))
    return AuditResult(
        adapter=adapter, method=METHOD, canaries=canaries, inserted=int(included.sum()), confidence=confidence,
        mu_estimate=mu, mu_estimate_lower=mu_lower, epsilon_estimate=gdp_epsilon(mu, delta),
        epsilon_estimate_lower=gdp_epsilon(mu_lower, delta), guesses=guesses, correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, delta=delta, confidence=confidence),
        epsilon_accounted=accounted, delta=delta, q=q, sigma=sigma, clip_norm=c, steps=steps, configuration=source,
        noise_multiplier_applied=applied_sigma, clip_norm_applied=applied_clip)


def _configuration(env: Any, adapter: str, config: AdapterTrainingConfig,
                   n: int) -> tuple[float, float, float, int, float, str]:
    runs = [r for r in env.ledger.state(adapter).runs if r["status"] == "completed"]
    if runs:
        r = runs[-1]
        return float(r["q"]), float(r["sigma"]), float(r["clip_norm"]), int(r["planned_steps"]), float(
            r["delta"]), f"run {r['run_id']}"
    plan = config.plan(n)
    return plan.q, plan.sigma, plan.clip_norm, plan.steps, plan.delta, "config"
