"""The one-run canary audit (Steinke, Nasr, Jagielski 2023): it passes a correct run and
catches a broken one, and touches neither the served adapter nor the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.trainer.audit import audit_adapter, epsilon_lower_bound, p_value
from tests.unit.trainer_helpers import fill_store, inputs, labelled_by, make_env, make_service, run_config, teacher


def test_the_bound_grows_with_correct_guesses_and_refutes_nothing_at_chance() -> None:
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    weak = epsilon_lower_bound(1000, 100, 70, delta=1e-5)
    strong = epsilon_lower_bound(1000, 100, 100, delta=1e-5)
    assert 0 < weak < strong
    # At the bound, the p-value is the confidence's complement (it is the largest ε refuted).
    assert p_value(1000, 100, 100, strong, 1e-5) == pytest.approx(0.05, abs=1e-3)
    # ε-DP randomized response would give accuracy e^ε/(1+e^ε): 100/100 refutes ε ≈ 3.
    assert 2.5 < strong < 3.5


def test_audit_passes_a_correct_run_and_catches_one_without_noise(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        x = inputs(100, seed=1)
        fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
        config = run_config(steps=20, batch_size=20.0, learning_rate=0.05, noise_multiplier=None,
                            target_epsilon=1.0, gate_noise_multiplier=50.0, count_noise=50.0)
        correct = audit_adapter(env, "alice", config, canaries=256, seed=3)
        assert correct.epsilon_accounted <= 1.0 and correct.consistent
        assert correct.epsilon_lower_bound <= correct.epsilon_accounted
        # The same configuration with σ = 0 (test-only): every guess right, a bound far
        # above the ε the correct run accounts.
        broken = audit_adapter(env, "alice", config, canaries=256, seed=3, noise_multiplier=0.0)
        assert broken.guesses == 64 and broken.correct >= 60
        assert broken.epsilon_lower_bound > 2 * correct.epsilon_accounted
        # A copy: nothing served, nothing charged.
        assert service.registry.current_version("alice") is None
        assert env.ledger.state("alice").runs == []
    finally:
        env.ledger.close()
        env.store.close()


def test_overriding_sigma_is_refused_with_secure_noise(tmp_path: Path) -> None:
    from dataclasses import replace

    from lorad.trainer.noise import SecureNoise

    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        with pytest.raises(ValueError, match="test-only"):
            audit_adapter(replace(env, noise=SecureNoise()), "alice", run_config(), noise_multiplier=0.0)
    finally:
        env.ledger.close()
        env.store.close()
