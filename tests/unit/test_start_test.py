"""The scheduler's start test (trainer/start_test.py): automatic runs start on a private
test of the counts, charged once per test, never at an exact threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorad.trainer.accountant import PureCharge, epsilon
from lorad.trainer.config import parse_trainer_section
from lorad.trainer.errors import PrivacyBudgetExceededError
from lorad.trainer.noise import SeededNoise
from lorad.trainer.service import TrainerService
from lorad.trainer.start_test import StartTests, margin
from tests.unit.trainer_helpers import inputs, make_service


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every call an interval later
        return self.now


def _tests(path: Path, seed: int) -> StartTests:
    return StartTests(path, SeededNoise(seed), interval_s=1.0, clock=Clock())


def _first_start(tests: StartTests, adapter: str, values: range, charges: list[int]) -> int | None:
    for v in values:
        if tests.check(adapter, v, epsilon=0.5, charge=lambda: charges.append(1)):
            return v
    return None


def test_the_start_is_charged_once_and_comes_at_a_noisy_count(tmp_path: Path) -> None:
    starts = []
    for seed in range(40):
        charges: list[int] = []
        tests = _tests(tmp_path / f"t{seed}.json", seed)
        # The counts grow one example per check, as they do when examples trickle in.
        start = _first_start(tests, "alice", range(-300, 600), charges)
        assert charges == [1], "one charge per test, however many checks it answers"
        assert start is not None
        starts.append(start)
        assert tests.open() == []
    # Not an exact threshold: the counts at which runs start vary from test to test,
    # around the margin above what a run needs (start_test.margin: 109 at ε₀ = 0.5).
    assert len(set(starts)) > 10
    assert 0 < float(np.median(starts)) < 1.5 * margin(0.5)
    assert sum(s < 0 for s in starts) <= 4  # a start while short is rare (the run's count then refuses)


def test_a_check_within_the_interval_does_not_look(tmp_path: Path) -> None:
    now = [0.0]
    tests = StartTests(tmp_path / "t.json", SeededNoise(0), interval_s=3600.0, clock=lambda: now[0])
    assert not tests.check("alice", -1000, epsilon=0.5, charge=lambda: None)
    assert not tests.check("alice", 10**6, epsilon=0.5, charge=lambda: None)  # too soon: not asked
    now[0] = 3600.0
    assert tests.check("alice", 10**6, epsilon=0.5, charge=lambda: None)


def test_a_restart_continues_the_test_without_paying_again(tmp_path: Path) -> None:
    charges: list[int] = []
    path = tmp_path / "start-tests.json"
    assert not _tests(path, 1).check("alice", -300, epsilon=0.5, charge=lambda: charges.append(1))
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # ρ is as private as the examples
    again = _tests(path, 2)
    assert again.open() == ["alice"]
    assert not again.check("alice", -300, epsilon=0.5, charge=lambda: charges.append(1))
    assert charges == [1]
    # A changed ε₀ is a new test, charged again.
    assert not again.check("alice", -300, epsilon=0.25, charge=lambda: charges.append(1))
    assert charges == [1, 1]


def test_the_start_test_is_a_ledger_charge_for_public_adapters_only(tmp_path: Path) -> None:
    config = parse_trainer_section({
        "testing": True, "noise": "seeded", "schedule": False, "isolate": False,
        "adapters": {"alice": {"noise_multiplier": 1.0, "accountant": "pld"}},
    })
    trainer = TrainerService(config, adapters=make_service(tmp_path), state_dir=tmp_path, proc_root=tmp_path,
                             sys_root=tmp_path)
    try:
        x = inputs(3, seed=1)
        for row in x:
            trainer.add_example("erin", {"x": row}, 1)
        # erin has examples but is not public: no test, no ledger entry, no metric series.
        assert trainer._candidates() == ["alice"]
        decision = trainer._adapter_ready("alice")
        assert not decision.allowed and "a private test decides" in decision.reasons[0]
        (record,) = trainer.ledger.state("alice").runs
        assert record["status"] == "query" and record["mechanisms"] == [{"what": "start_test", "epsilon": 0.5}]
        # Pure ε₀-DP under PLD: the test alone is ε₀ at any δ.
        assert trainer.ledger.state("alice").epsilon_spent == pytest.approx(0.5, abs=1e-3)
        trainer.start_tests._interval = 0.0  # the next check now, not in an hour
        trainer._adapter_ready("alice")
        assert len(trainer.ledger.state("alice").runs) == 1  # the same test goes on
        assert trainer.ledger.adapters() == ["alice"]
    finally:
        trainer.close()


def test_a_pure_charge_composes_in_both_accountants() -> None:
    assert epsilon(runs=[PureCharge(0.5)], delta=1e-5, accountant="pld") == pytest.approx(0.5, abs=1e-3)
    # RDP takes it as (ε₀²/2)-zCDP: valid, looser alone, little more when composed.
    assert epsilon(runs=[PureCharge(0.5)], delta=1e-5, accountant="rdp") > 0.5
    with pytest.raises(ValueError, match="pure-DP charge"):
        PureCharge(0.0)


def test_no_budget_no_test(tmp_path: Path) -> None:
    tests = _tests(tmp_path / "t.json", 0)

    def refuse() -> None:
        raise PrivacyBudgetExceededError("alice", spent_epsilon=8, requested_epsilon=8.2, budget_epsilon=8)

    with pytest.raises(PrivacyBudgetExceededError):
        tests.check("alice", 1000, epsilon=0.5, charge=refuse)
    assert tests.open() == []
