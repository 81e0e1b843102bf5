"""An empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846): insert m
canaries, each independently with probability ½, train ONCE, score every canary, guess
"in" for the r/2 highest scores and "out" for the r/2 lowest (abstain on the rest), and
count the v correct guesses. If training is (ε, δ)-DP, v is stochastically dominated by
Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3.1 / Algorithm 2, which
:func:`p_value` implements), so every ε whose p-value for v is below 1 - confidence is
refuted: the largest such ε is an empirical lower bound on the run's true ε. A correct
DP-SGD run gives a bound at or below its accounted ε (usually far below: one-run
audits in input space are loose); a broken one (no noise) exceeds it.

Here the canaries are the paper's white-box gradient canaries (their Section 6.2, the
strongest of their attacks on DP-SGD): canary i is an example whose clipped gradient is
``C·e_{j_i}``, a unit vector along its own randomly chosen LoRA parameter ``j_i`` scaled to
the clipping norm (the largest contribution one example may make). It is Poisson
sampled with rate q like every example and, when sampled, its gradient joins the clipped
sum inside the training graph (through the same input the Gaussian noise comes in).
The score of canary i is how far parameter ``j_i`` moved against that gradient, from
its initial value to the trained one. The audit trains with the adapter's configuration
— the (q, σ, C, steps) of its last completed run, else the plan its config gives at its
budget — and its optimiser and learning rate, on a COPY of its training split held in
memory: nothing is installed, served, stored or charged to the adapter's ledger.

The result is a function of the adapter's data, so it is returned only to
authenticated callers (like the exact example count) and never published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .accountant import RunCharge, epsilon
from .backends import Stepper, open_stepper
from .batching import collate
from .config import AdapterTrainingConfig
from .dp_step import DPSettings, GaussianNoise
from .errors import BadTrainingDataError

__all__ = ["AuditResult", "p_value", "epsilon_lower_bound", "audit_adapter"]

#: Share of the canaries guessed on (half "in" from the top scores, half "out").
_GUESS_FRACTION = 0.25


@dataclass(frozen=True)
class AuditResult:
    adapter: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    #: The empirical lower bound on ε at ``delta`` (0.0 when nothing can be refuted).
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

    @property
    def consistent(self) -> bool:
        """Whether the audit found nothing beyond the accounted ε."""
        return self.epsilon_lower_bound <= self.epsilon_accounted

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = {**asdict(self), "consistent": self.consistent}
        # σ = 0 (test-only) accounts ε = ∞, which JSON cannot carry: null means unbounded.
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


def audit_adapter(
    env: Any, adapter: str, config: AdapterTrainingConfig, *, canaries: int = 512, confidence: float = 0.95,
    seed: int | None = None, noise_multiplier: float | None = None,
) -> AuditResult:
    """Run the one-run audit of ``adapter`` (``env``: a :class:`lorad.trainer.run.TrainerEnv`).

    ``noise_multiplier`` overrides σ; it exists to show the audit can fail (σ = 0) and is
    refused unless the environment's noise source is the seeded test one.
    """
    from .model_setup import pad_length, preflight, training_layouts

    if canaries < 8:
        raise ValueError(f"canaries must be >= 8, got {canaries}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if noise_multiplier is not None and getattr(env.noise, "secure", False):
        raise ValueError("overriding σ is a test-only setting (trainer.testing with seeded noise)")
    train_ids, _ = env.store.split(adapter, config.holdout_fraction, config.split_seed)
    data = env.store.load(train_ids, skip_missing=True)
    if not data:
        raise BadTrainingDataError(f"adapter {adapter!r} has no training examples to audit with; add examples")
    q, sigma, clip_norm, steps, delta, source = _configuration(env, adapter, config, len(data))
    if noise_multiplier is not None:
        sigma = noise_multiplier
    rng = np.random.default_rng(seed)
    service = env.service
    artifacts = preflight(service, config, cache_dir=env.state_dir / "artifacts", backend=env.backend)
    if artifacts.noise_size < canaries:
        raise ValueError(f"{canaries} canaries need as many trainable LoRA parameters; the adapter has "
                         f"{artifacts.noise_size}; use fewer canaries")
    layouts = training_layouts(artifacts)
    coords = rng.choice(artifacts.noise_size, size=canaries, replace=False)
    included = rng.random(canaries) < 0.5
    planted = coords[included]

    def canary_gradients() -> np.ndarray:
        g = np.zeros(artifacts.noise_size, np.float64)
        g[planted[rng.random(planted.size) < q]] = clip_norm
        return g

    dp = DPSettings(noise_multiplier=sigma, clip_norm=clip_norm,
                    expected_batch_size=max(q * (len(data) + planted.size), 1e-9))
    noise: GaussianNoise = env.noise
    stepper = open_stepper(artifacts, learning_rate=config.learning_rate, dp=dp, noise=noise,
                           device=env.device, intra_op_threads=env.intra_op_threads, canary_gradients=canary_gradients)
    before = _flat(stepper, artifacts)
    for _ in range(steps):
        picked = [data[i] for i in np.flatnonzero(rng.random(len(data)) < q)]
        batch, _ = collate(picked, inputs_layout=layouts[:-1], label_layout=layouts[-1], pad_to=pad_length(service, config))
        stepper.step(batch)
    # Descent moves a parameter against its gradient: an included canary's parameter falls.
    scores = (before - _flat(stepper, artifacts))[coords]
    guesses = max(2, int(canaries * _GUESS_FRACTION) // 2 * 2)
    # Ties are broken at random so that equal scores carry no information.
    order = np.lexsort((rng.random(canaries), scores))
    guessed_out, guessed_in = order[: guesses // 2], order[canaries - guesses // 2:]
    correct = int(np.sum(included[guessed_in]) + np.sum(~included[guessed_out]))
    lower = epsilon_lower_bound(canaries, guesses, correct, delta=delta, confidence=confidence)
    accounted = (math.inf if sigma == 0 else
                 epsilon(runs=[RunCharge(q=q, sigma=sigma, steps=steps)], delta=delta, accountant=config.accountant))
    return AuditResult(adapter=adapter, canaries=canaries, guesses=guesses, correct=correct, confidence=confidence,
                       epsilon_lower_bound=lower, epsilon_accounted=accounted, delta=delta, q=q, sigma=sigma,
                       clip_norm=clip_norm, steps=steps, configuration=source)


def _flat(stepper: Stepper, artifacts: Any) -> np.ndarray:
    """The trainable parameters laid end to end in the noise vector's order."""
    params = stepper.parameters()
    return np.concatenate([params[name].astype(np.float64).reshape(-1) for name, _ in artifacts.trainable])


def _configuration(env: Any, adapter: str, config: AdapterTrainingConfig,
                   n: int) -> tuple[float, float, float, int, float, str]:
    runs = [r for r in env.ledger.state(adapter).runs if r["status"] == "completed"]
    if runs:
        r = runs[-1]
        return float(r["q"]), float(r["sigma"]), float(r["clip_norm"]), int(r["planned_steps"]), float(
            r["delta"]), f"run {r['run_id']}"
    plan = config.plan(n)
    return plan.q, plan.sigma, plan.clip_norm, plan.steps, plan.delta, "config"
