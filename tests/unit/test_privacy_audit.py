"""The one-run privacy audit (trainer/audit.py): its canaries go through the training
graph's own clip, it passes a correct run of lorad's default ε = 8 configuration and
reports the same run with its noise removed, or with its clipping off, as a violation;
and it touches neither the served adapter nor the ledger."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm  # type: ignore[import-untyped]

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.trainer.artifacts import ArtifactConfig, TrainingArtifacts, build_artifacts
from lorad.trainer.audit import AuditResult, audit_adapter, epsilon_lower_bound, gaussian_mu, gdp_epsilon, p_value
from lorad.trainer.config import AdapterTrainingConfig
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.example_store import ExampleStore
from lorad.trainer.ledger import PrivacyLedger
from lorad.trainer.noise import SecureNoise, SeededNoise
from lorad.trainer.portable import PortableStepper
from lorad.trainer.run import TrainerEnv
from tests.unit.trainer_helpers import CLASSES, SEQ, CanaryRows, D, make_env, make_service, run_config, tiny_model

# -- the maths -------------------------------------------------------------------------------


def test_the_bound_grows_with_correct_guesses_and_refutes_nothing_at_chance() -> None:
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    weak = epsilon_lower_bound(1000, 100, 70, delta=1e-5)
    strong = epsilon_lower_bound(1000, 100, 100, delta=1e-5)
    assert 0 < weak < strong
    # At the bound, the p-value is the confidence's complement (it is the largest ε refuted).
    assert p_value(1000, 100, 100, strong, 1e-5) == pytest.approx(0.05, abs=1e-3)
    # ε-DP randomized response would give accuracy e^ε/(1+e^ε): 100/100 refutes ε ≈ 3.
    assert 2.5 < strong < 3.5


def test_gdp_epsilon_solves_the_gaussian_tradeoff() -> None:
    def delta_of(eps: float, mu: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    previous = 0.0
    for mu in (0.5, 1.0, 1.32, 2.0, 4.0):
        eps = gdp_epsilon(mu, 1e-5)
        assert eps > previous and delta_of(eps, mu) == pytest.approx(1e-5, rel=1e-6)
        previous = eps
    # Reference values: 1-GDP is (4.38, 1e-5)-DP; ε = 8 at δ = 1e-5 takes μ ≈ 1.67.
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=1e-3)
    assert next(m / 100 for m in range(100, 300) if gdp_epsilon(m / 100, 1e-5) > 8) == 1.67
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(math.inf, 1e-5) == math.inf
    assert gdp_epsilon(0.01, 0.1) == 0.0  # δ(0) already below δ
    assert gdp_epsilon(60.0, 1e-5) > 1000  # far tails stay finite and ordered (log space)


def test_gaussian_mu_recovers_the_shift_and_its_lower_bound_covers_it() -> None:
    rng = np.random.default_rng(0)
    below = 0
    for trial in range(200):
        mu, lower = gaussian_mu(rng.normal(1.5, 1.0, 500), rng.normal(0.0, 1.0, 500), confidence=0.95)
        assert lower < mu
        below += lower <= 1.5
        if trial == 0:
            assert mu == pytest.approx(1.5, abs=0.25)
    assert 0.9 <= below / 200 <= 0.99  # a one-sided 95 % bound
    assert gaussian_mu(np.ones(1), np.zeros(5)) == (0.0, 0.0)
    assert gaussian_mu(np.ones(5), np.zeros(5)) == (math.inf, math.inf)
    assert gaussian_mu(-np.ones(5), rng.normal(size=5))[0] == 0.0


# -- the canaries go through the training graph's clip -----------------------------------------



class _NoNoise:
    def gaussian64(self, n: int, std: float) -> np.ndarray:
        return np.zeros(n)


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> TrainingArtifacts:
    config = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=4, alpha=8.0)
    return build_artifacts(tiny_model(), config, cache_dir=tmp_path_factory.mktemp("artifacts"), backend="portable")


def _batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.normal(size=(n, SEQ, D)).astype(np.float32), "labels": rng.integers(0, CLASSES, n)}


@pytest.mark.parametrize("clip_norm, expected_factor", [(0.1, 0.25), (1e6, 1.0)])
@pytest.mark.parametrize("n", [6, 0])
def test_canary_rows_are_clipped_with_the_examples(tiny_artifacts: TrainingArtifacts, clip_norm: float,
                                                   expected_factor: float, n: int) -> None:
    size = tiny_artifacts.noise_size
    u = np.random.default_rng(1).normal(size=size)
    row = (0.4 * u / np.linalg.norm(u)).astype(np.float32)  # norm 4·0.1
    dp = DPSettings(noise_multiplier=0.0, clip_norm=clip_norm, expected_batch_size=8.0)
    plain = PortableStepper(tiny_artifacts, learning_rate=0.01, dp=dp, noise=_NoNoise())
    feed = CanaryRows(row[None, :])
    audited = PortableStepper(tiny_artifacts, learning_rate=0.01, dp=dp, noise=_NoNoise(), canaries=feed)
    try:
        batch = _batch(n)
        if n:
            # With no canary rows the audit's variant computes the training graph's gradient.
            want, _ = plain.gradient(batch, clip_norm=clip_norm)
            got, _ = audited.gradient(batch, clip_norm=clip_norm)
            np.testing.assert_array_equal(got, want)
        audited.step(batch)
        (released, examples), = feed.seen
        if n:
            np.testing.assert_allclose(examples, want, rtol=1e-5, atol=1e-7)  # gradient(): unscaled
        else:
            assert not examples.any()  # the empty batch's placeholder is weighed 0
        # The canary's share of the release: its row, clipped to C by the graph's own clip.
        np.testing.assert_allclose(released - examples, expected_factor * row, rtol=1e-4, atol=1e-6)
    finally:
        plain.close()
        audited.close()


def test_canary_rows_need_private_artifacts_and_the_right_shape(tiny_artifacts: TrainingArtifacts) -> None:
    dp = DPSettings(noise_multiplier=0.0, clip_norm=0.1, expected_batch_size=8.0)
    with pytest.raises(ValueError, match="private"):
        PortableStepper(tiny_artifacts, learning_rate=0.01, dp=None, noise=None, canaries=CanaryRows(np.zeros((0, 1))))
    stepper = PortableStepper(tiny_artifacts, learning_rate=0.01, dp=dp, noise=_NoNoise(),
                              canaries=CanaryRows(np.zeros((1, 3), np.float32)))
    try:
        with pytest.raises(ValueError, match="canary rows"):
            stepper.step(_batch(2))
    finally:
        stepper.close()


# -- the audit of lorad's default configuration at ε = 8 on the demo model ----------------------

_CANARIES = 1000


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerEnv]:
    """The demo MLP and 400 examples of its plus-one task (benchmarks/dp_tasks.py)."""
    import onnx

    from lorad.daemon.demo.build import DEMO_TASKS, load_split

    root = tmp_path_factory.mktemp("demo-audit")
    engine = InferenceEngine(onnx.load(demo_model_path()), targets=DEMO_TARGETS, rank=DEMO_RANK)
    service = AdapterService(engine, AdapterRegistry(root / "adapters"), cache_budget_bytes=1 << 24)
    store = ExampleStore(root / "examples.sqlite3", max_examples_per_adapter=10_000, max_bytes=1 << 26,
                         retention_days=30)
    ledger = PrivacyLedger(root / "privacy-ledger.json")
    split = load_split()
    task = next(t for t in DEMO_TASKS if t.name == "plus-one")
    x, y = task.apply(split.x_train, split.y_train)
    for row, label in zip(x[:400].astype(np.float32), y[:400], strict=True):
        store.add("alice", {engine.inputs[0].name: row}, np.asarray(int(label), np.int64))
    try:
        yield TrainerEnv(service=service, store=store, ledger=ledger, state_dir=root, noise=SeededNoise(11),
                         rng=lambda: np.random.default_rng(0), isolate=False)
    finally:
        ledger.close()
        store.close()


#: lorad's defaults planned at ε = 8 (every stored example trains: q 0.16, 188 steps).
_EPS8 = AdapterTrainingConfig(target_epsilon=8.0, budget_fraction=1.0, holdout_fraction=1e-9)


@pytest.fixture(scope="module")
def correct(demo_env: TrainerEnv) -> AuditResult:
    return audit_adapter(demo_env, "alice", _EPS8, canaries=_CANARIES, seed=3)


def test_a_correct_run_at_the_default_epsilon_8_is_consistent(demo_env: TrainerEnv, correct: AuditResult) -> None:
    assert (correct.q, correct.steps, correct.configuration) == (0.16, 188, "config")
    assert 7.8 < correct.epsilon_accounted < 8.0 and correct.consistent
    # μ of this configuration is about q·√T/σ = 1.32 (module docstring of trainer/audit.py).
    assert 1.0 < correct.mu_estimate < 1.65
    assert correct.epsilon_estimate_lower < correct.epsilon_estimate < correct.epsilon_accounted
    assert correct.epsilon_lower_bound < correct.epsilon_accounted
    assert correct.noise_multiplier_applied == correct.sigma and correct.clip_norm_applied == correct.clip_norm
    assert 400 < correct.inserted < 600
    # A copy: nothing served, nothing charged.
    assert demo_env.service.registry.current_version("alice") is None
    assert demo_env.ledger.state("alice").runs == []
    doc = correct.to_dict()
    assert doc["consistent"] is True and "Andrew et al. 2024" in doc["method"]


def test_the_same_run_with_its_noise_removed_is_a_violation(demo_env: TrainerEnv, correct: AuditResult) -> None:
    broken = audit_adapter(demo_env, "alice", _EPS8, canaries=_CANARIES, seed=3, noise_multiplier=0.0)
    # σ is still the configuration's and accounted as such: only the noise is gone.
    assert broken.sigma == correct.sigma and broken.epsilon_accounted == correct.epsilon_accounted
    assert broken.noise_multiplier_applied == 0.0
    assert not broken.consistent
    assert broken.epsilon_estimate_lower > broken.epsilon_accounted
    assert broken.correct == broken.guesses  # every guess of the rigorous bound right
    doc = broken.to_dict()
    assert doc["consistent"] is False and doc["epsilon_accounted"] == pytest.approx(correct.epsilon_accounted)


def test_the_same_run_without_clipping_is_a_violation(demo_env: TrainerEnv, correct: AuditResult) -> None:
    # The graph clips at 10⁶ (i.e. not at all) while the noise stays σ·C: the canaries'
    # raw gradients (4·C) come through, which they can only if they pass the clip.
    unclipped = audit_adapter(demo_env, "alice", _EPS8, canaries=_CANARIES, seed=3, clip_norm=1e6)
    assert unclipped.clip_norm_applied == 1e6 and unclipped.clip_norm == correct.clip_norm
    assert not unclipped.consistent
    assert unclipped.epsilon_estimate_lower > unclipped.epsilon_accounted
    assert unclipped.mu_estimate > 3 * correct.mu_estimate


def test_more_canaries_than_parameters_are_refused(demo_env: TrainerEnv) -> None:
    with pytest.raises(ValueError, match="at most 4688 canaries"):
        audit_adapter(demo_env, "alice", _EPS8, canaries=5000, seed=3)


def test_overriding_sigma_or_c_is_refused_with_secure_noise(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        for fault in ({"noise_multiplier": 0.0}, {"clip_norm": 1e6}):
            with pytest.raises(ValueError, match="test-only"):
                audit_adapter(replace(env, noise=SecureNoise()), "alice", run_config(), **fault)
    finally:
        env.ledger.close()
        env.store.close()
