"""The trainer: config section: defaults, merging, errors that name key/value/allowed, plans."""

from __future__ import annotations

import math

import pytest

from lorad.trainer.accountant import RunCharge, epsilon
from lorad.trainer.config import (
    AdapterTrainingConfig,
    TrainerConfig,
    TrainerConfigError,
    check_noise_source,
    default_delta,
    make_noise_source,
    parse_trainer_section,
)
from lorad.trainer.noise import SecureNoise, SeededNoise


def _error(data: object) -> TrainerConfigError:
    with pytest.raises(TrainerConfigError) as info:
        parse_trainer_section(data)
    return info.value


def test_empty_section_is_the_defaults() -> None:
    assert parse_trainer_section(None) == TrainerConfig()
    assert parse_trainer_section({}) == TrainerConfig()
    c = TrainerConfig()
    assert c.noise == "secure" and not c.testing and c.intra_op_threads == 1 and c.niceness == 10


def test_full_section() -> None:
    c = parse_trainer_section({
        "schedule": False, "niceness": 15, "check_interval_s": 5,
        "store": {"max_bytes": "64MiB", "max_examples_per_adapter": 100, "retention_days": 7},
        "policy": {"min_new_examples": 10, "time_window": "22:30-06:00", "require_external_power": True,
                   "max_temperature_c": 75},
        "defaults": {"target_epsilon": 4, "clip_norm": 0.5, "batch_size": 32, "epochs": 2},
        "adapters": {"alice": {"target_epsilon": 2, "sampling_rate": 0.1}, "bob": None},
    })
    assert c.store.max_bytes == 64 * 1024**2 and c.store.max_examples_per_adapter == 100
    assert c.policy.time_window == (22 * 60 + 30, 6 * 60) and c.policy.require_external_power
    assert c.policy.max_temperature_c == 75.0
    alice = c.for_adapter("alice")
    # Overrides merge over the defaults; giving q replaces the inherited batch size.
    assert (alice.target_epsilon, alice.clip_norm, alice.sampling_rate, alice.batch_size) == (2.0, 0.5, 0.1, None)
    assert c.for_adapter("bob") == c.defaults
    assert c.for_adapter("unknown") == c.defaults


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"noise": "seeded"}, "trainer.noise", ["seeded", "trainer.testing: true", "secure"]),
        ({"noise": "urandom"}, "trainer.noise", ["'urandom'", "secure, seeded"]),
        ({"noise_seed": 3}, "trainer.noise_seed", ["3", "seeded"]),
        ({"bogus": 1}, "trainer.bogus", ["unknown key", "niceness"]),
        ({"niceness": 25}, "trainer.niceness", ["25", "from 0 to 19"]),
        ({"backend": "tensorflow"}, "trainer.backend", ["'tensorflow'", "portable", "ort-training", "auto"]),
        ({"store": {"max_bytes": "lots"}}, "trainer.store.max_bytes", ["'lots'", "MiB"]),
        ({"policy": {"time_window": "25:00-01:00"}}, "trainer.policy.time_window", ["25:00-01:00", "HH:MM-HH:MM"]),
        ({"policy": {"time_window": "01:00-01:00"}}, "trainer.policy.time_window", ["empty"]),
        ({"defaults": {"clip_norm": -1}}, "trainer.defaults.clip_norm", ["-1", "> 0"]),
        ({"adapters": {"alice": {"delta": 1.5}}}, "trainer.adapters.alice.delta", ["1.5", "< 1"]),
        ({"adapters": {"alice": {"sampling_rate": 0.1, "batch_size": 8}}}, "trainer.adapters.alice.sampling_rate",
         ["exactly one of sampling_rate", "batch_size"]),
        ({"adapters": {"alice": {"steps": 10, "epochs": 2}}}, "trainer.adapters.alice.steps", ["exactly one"]),
        ({"adapters": {"alice": {"accountant": "gdp"}}}, "trainer.adapters.alice.accountant", ["'gdp'", "rdp, pld"]),
        ({"adapters": {"alice": {"loss": "mse", "validation_metric": "accuracy"}}},
         "trainer.adapters.alice.validation_metric", ["accuracy", "cross_entropy"]),
        ({"adapters": {"alice": {"holdout_fraction": 0}}}, "trainer.adapters.alice.holdout_fraction", ["0"]),
        ({"adapters": {"al ice": {}}}, "trainer.adapters.al ice", ["not an adapter name"]),
        ({"adapters": {"alice": {"rank": "eight"}}}, "trainer.adapters.alice.rank", ["'eight'", "integer"]),
        ({"adapters": {"alice": {"colour": 1}}}, "trainer.adapters.alice.colour", ["unknown key", "clip_norm"]),
        ({"defaults": [1]}, "trainer.defaults", ["mapping"]),
    ],
)
def test_errors_name_key_value_and_allowed(data: object, key: str, words: list[str]) -> None:
    e = _error(data)
    assert e.key == key
    assert str(e).startswith(key + ":")
    for w in words:
        assert w in str(e)


def test_seeded_noise_only_in_testing_mode() -> None:
    c = parse_trainer_section({"testing": True, "noise": "seeded", "noise_seed": 5})
    assert isinstance(make_noise_source(c), SeededNoise)
    assert isinstance(make_noise_source(TrainerConfig()), SecureNoise)
    with pytest.raises(TrainerConfigError, match=r"trainer.noise"):
        TrainerConfig(noise="seeded")
    # A predictable source handed in directly is refused by a production config too.
    with pytest.raises(TrainerConfigError) as info:
        check_noise_source(SeededNoise(0), TrainerConfig())
    assert info.value.key == "trainer.testing" and "SecureNoise" in str(info.value)
    check_noise_source(SeededNoise(0), c)
    check_noise_source(SecureNoise(), TrainerConfig())


def test_default_delta_is_below_one_over_n() -> None:
    for n in (1, 10, 1000, 10**5, 10**7):
        assert default_delta(n) < 1 / n
        assert default_delta(n) <= 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)


def test_plan_from_batch_size_and_epochs() -> None:
    plan = AdapterTrainingConfig(batch_size=50, epochs=2, noise_multiplier=1.1, target_epsilon=8).plan(1000)
    assert plan.q == pytest.approx(0.05)
    assert plan.expected_batch_size == pytest.approx(50)
    assert plan.steps == 40
    assert plan.sigma == 1.1 and plan.delta == 1e-5 and plan.examples == 1000


def test_plan_spends_the_budget_fraction_with_count_and_gate_queries() -> None:
    c = AdapterTrainingConfig(sampling_rate=0.02, batch_size=None, steps=200, epochs=None,
                              target_epsilon=3.0, budget_fraction=0.5)
    plan = c.plan(5000)
    queries = [RunCharge(q=1.0, sigma=s, steps=1) for _, s in plan.mechanisms]
    assert {w for w, _ in plan.mechanisms} == {"example_count", "validation_gate"}
    spent = epsilon(runs=[*queries, RunCharge(q=plan.q, sigma=plan.sigma, steps=plan.steps)],
                    delta=plan.delta, accountant="rdp")
    assert 1.5 - 0.015 <= spent <= 1.5
    # The next run spends half of what is left, on top of what the first one charged.
    second = c.plan(5000, prior=[*queries, RunCharge(q=plan.q, sigma=plan.sigma, steps=plan.steps)],
                    ledger_delta=plan.delta)
    both = epsilon(runs=[*queries, *queries, RunCharge(q=plan.q, sigma=plan.sigma, steps=plan.steps),
                         RunCharge(q=second.q, sigma=second.sigma, steps=second.steps)],
                   delta=plan.delta, accountant="rdp")
    assert 2.25 - 0.02 <= both <= 2.25


def test_plan_refuses_large_delta_and_too_few_examples() -> None:
    with pytest.raises(ValueError, match="not below 1/n"):
        AdapterTrainingConfig(delta=0.01, noise_multiplier=1.0).plan(100)
    # On the private estimate of the training count; the held-out count follows from it.
    config = AdapterTrainingConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"too few examples.*private estimate.*private count was charged"):
        config.check_estimate(99.5)
    assert config.holdout_needed == 20  # max(min_holdout_examples, 1.645·σ_g = 17)
    with pytest.raises(ValueError, match="20 held-out"):
        AdapterTrainingConfig(noise_multiplier=1.0, holdout_fraction=0.1).check_estimate(150)
    config.check_estimate(100)
    assert config.shortfall(130, 25) == 5 and config.shortfall(90, 400) == -10


def test_dataclass_is_validated_when_built() -> None:
    with pytest.raises(TrainerConfigError, match="clip_norm"):
        AdapterTrainingConfig(clip_norm=math.nan)
