"""The privacy ledger: write-ahead charges, budget refusal, restarts, strict loading."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import lorad.trainer.ledger as ledger_module
from lorad.trainer.accountant import RunCharge, epsilon
from lorad.trainer.errors import BadTrainingDataError, PrivacyBudgetExceededError, TrainingFailedError
from lorad.trainer.ledger import PrivacyLedger

RUN: dict[str, Any] = dict(q=0.05, sigma=1.0, clip_norm=1.0, examples=500, accountant="rdp",
                           delta=1e-5, budget_epsilon=10.0)


def _eps(*steps: int) -> float:
    return epsilon(runs=[RunCharge(q=0.05, sigma=1.0, steps=s) for s in steps], delta=1e-5,
                   accountant="rdp")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "privacy.json"


def test_begin_charges_all_planned_steps_before_returning(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        run = ledger.begin_run("alice", planned_steps=100, **RUN)
        on_disk = json.loads(path.read_text())
        (record,) = on_disk["adapters"]["alice"]["runs"]
        assert record["run_id"] == run and record["steps_charged"] == 100
        assert record["status"] == "running"
        assert ledger.state("alice").epsilon_spent == pytest.approx(_eps(100))


def test_end_run_lowers_charge_to_steps_done(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        run = ledger.begin_run("alice", planned_steps=100, **RUN)
        ledger.record_progress(run, 20)
        assert ledger.state("alice").epsilon_spent == pytest.approx(_eps(100))
        ledger.end_run(run, steps_done=40, status="cancelled")
        state = ledger.state("alice")
    assert state.epsilon_spent == pytest.approx(_eps(40))
    (record,) = state.runs
    assert (record["steps_done"], record["steps_charged"], record["status"]) == (40, 40, "cancelled")
    assert record["ended_at"] >= record["started_at"]


def test_runs_compose_across_restarts(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=50, **RUN), steps_done=50,
                       status="completed")
        ledger.begin_run("bob", planned_steps=10, **RUN)
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=30, **RUN), steps_done=30,
                       status="completed")
        alice, bob = ledger.state("alice"), ledger.state("bob")
        assert ledger.adapters() == ["alice", "bob"]
    assert alice.epsilon_spent == pytest.approx(_eps(50, 30))
    assert alice.budget_left == pytest.approx(10.0 - alice.epsilon_spent)
    assert [r["run_id"] for r in alice.runs] == [1, 3]
    assert bob.epsilon_spent == pytest.approx(_eps(10))  # never ended: charged in full


def test_delta_only_goes_down_so_epsilon_spent_never_does(path: Path) -> None:
    """Raising δ in the config later must not recompute the ε already spent at a larger δ
    (a smaller number): the adapter keeps the smallest δ any of its runs asked for."""
    def eps(delta: float, *steps: int) -> float:
        return epsilon(runs=[RunCharge(q=0.05, sigma=1.0, steps=s) for s in steps], delta=delta,
                       accountant="rdp")

    strict = {**RUN, "delta": 1e-6}
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=200, **strict), steps_done=200,
                       status="completed")
        first = ledger.state("alice")
        assert first.delta == 1e-6 and first.epsilon_spent == pytest.approx(eps(1e-6, 200))
        # A budget the two runs fit at δ=1e-5 but not at 1e-6: refused, since ε is at 1e-6.
        budget = (eps(1e-5, 200, 50) + eps(1e-6, 200, 50)) / 2
        with pytest.raises(PrivacyBudgetExceededError) as exc:
            ledger.begin_run("alice", planned_steps=50, **{**RUN, "budget_epsilon": budget})
        assert exc.value.spent_epsilon == pytest.approx(first.epsilon_spent)
        ledger.begin_run("alice", planned_steps=50, **RUN)  # asks for δ=1e-5
        second = ledger.state("alice")
    assert second.delta == 1e-6
    assert second.epsilon_spent == pytest.approx(eps(1e-6, 200, 50))
    assert second.epsilon_spent > first.epsilon_spent
    assert [r["delta"] for r in second.runs] == [1e-6, 1e-5]  # each run's request is kept
    assert json.loads(path.read_text())["adapters"]["alice"]["delta"] == 1e-6
    with PrivacyLedger(path) as ledger:
        assert ledger.state("alice").epsilon_spent == pytest.approx(second.epsilon_spent)
        ledger.begin_run("alice", planned_steps=1, **{**RUN, "delta": 1e-7})
        assert ledger.state("alice").delta == 1e-7


def test_budget_refusal_names_everything_and_charges_nothing(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=500, **RUN), steps_done=500,
                       status="completed")
        before = path.read_bytes()
        with pytest.raises(PrivacyBudgetExceededError) as exc:
            ledger.begin_run("alice", planned_steps=100_000, **RUN)
        assert path.read_bytes() == before
    err = exc.value
    assert err.adapter == "alice" and err.budget_epsilon == 10.0
    assert err.spent_epsilon == pytest.approx(_eps(500))
    assert err.requested_epsilon > 10.0
    message = str(err)
    for word in ("'alice'", f"{err.spent_epsilon:.4g}", f"{err.requested_epsilon:.4g}", "10"):
        assert word in message


def test_state_is_json_and_recomputable(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=70, **RUN), steps_done=60,
                       status="failed")
        ledger.begin_run("alice", planned_steps=5, **{**RUN, "q": 0.1, "sigma": 2.0})
        doc = json.loads(json.dumps(ledger.state("alice").to_dict()))
    runs = [RunCharge(q=r["q"], sigma=r["sigma"], steps=r["steps_charged"]) for r in doc["runs"]]
    assert epsilon(runs=runs, delta=doc["delta"], accountant=doc["accountant"]) == pytest.approx(
        doc["epsilon_spent"])
    for key in ("q", "sigma", "clip_norm", "planned_steps", "steps_done", "examples",
                "accountant", "delta", "started_at", "ended_at", "status"):
        assert key in doc["runs"][0]


def test_unknown_adapter_has_empty_state(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        state = ledger.state("nobody")
    assert state.epsilon_spent == 0.0 and state.runs == [] and state.budget_left is None


def test_call_order_and_argument_errors(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        run = ledger.begin_run("alice", planned_steps=10, **RUN)
        with pytest.raises(ValueError, match="run_id 99"):
            ledger.end_run(99, steps_done=1, status="completed")
        with pytest.raises(ValueError, match=r"steps_done .* \[0 .*, 10 \(planned\)\], got 11"):
            ledger.end_run(run, steps_done=11, status="completed")
        ledger.record_progress(run, 5)
        with pytest.raises(ValueError, match="progress already recorded"):
            ledger.end_run(run, steps_done=4, status="completed")
        with pytest.raises(ValueError, match="status must be one of"):
            ledger.end_run(run, steps_done=5, status="running")
        ledger.end_run(run, steps_done=5, status="completed")
        with pytest.raises(RuntimeError, match="already ended"):
            ledger.end_run(run, steps_done=5, status="completed")
        with pytest.raises(ValueError, match="adapter name"):
            ledger.begin_run("../etc", planned_steps=10, **RUN)
        with pytest.raises(ValueError, match="clip_norm"):
            ledger.begin_run("alice", planned_steps=10, **{**RUN, "clip_norm": 0.0})
        with pytest.raises(ValueError, match="q"):
            ledger.begin_run("alice", planned_steps=10, **{**RUN, "q": 2.0})
        with pytest.raises(ValueError, match="planned_steps"):
            ledger.begin_run("alice", planned_steps=0, **RUN)
    with pytest.raises(RuntimeError, match="closed"):
        ledger.state("alice")


def test_one_process_at_a_time(path: Path) -> None:
    first = PrivacyLedger(path)
    with pytest.raises(RuntimeError, match="open in another process"):
        PrivacyLedger(path)
    first.close()
    first.close()
    PrivacyLedger(path).close()


def test_failed_write_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with PrivacyLedger(path) as ledger:
        monkeypatch.setattr(ledger_module, "atomic_write_bytes", broken)
        with pytest.raises(TrainingFailedError, match="No space left"):
            ledger.begin_run("alice", planned_steps=10, **RUN)
        assert ledger.state("alice").runs == []
    assert not path.exists()


def test_threads(path: Path) -> None:
    errors: list[BaseException] = []

    with PrivacyLedger(path) as ledger:
        def work(i: int) -> None:
            try:
                for _ in range(5):
                    run = ledger.begin_run(f"a{i % 3}", planned_steps=4, **RUN)
                    ledger.end_run(run, steps_done=2, status="completed")
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    with PrivacyLedger(path) as ledger:
        runs = [r for a in ledger.adapters() for r in ledger.state(a).runs]
    assert sorted(r["run_id"] for r in runs) == list(range(1, 31))
    assert all(r["steps_charged"] == 2 for r in runs)


def _valid_doc(path: Path) -> dict[str, Any]:
    with PrivacyLedger(path) as ledger:
        ledger.end_run(ledger.begin_run("alice", planned_steps=10, **RUN), steps_done=5,
                       status="completed")
    return json.loads(path.read_text())


def _set(doc: dict[str, Any], keys: tuple[Any, ...], value: Any) -> None:
    for k in keys[:-1]:
        doc = doc[k]
    if value is _DELETE:
        del doc[keys[-1]]
    else:
        doc[keys[-1]] = value


_DELETE = object()
_R = ("adapters", "alice", "runs", 0)


@pytest.mark.parametrize(
    ("keys", "value", "words"),
    [
        (("version",), 2, "version must be 1"),
        (("format",), "x", "format"),
        (("next_run_id",), "1", "next_run_id must be int"),
        (("adapters", "alice", "delta"), 1.5, "delta must be in (0, 1)"),
        (("adapters", "alice", "accountant"), "prv", "accountant"),
        ((*_R, "steps_charged"), 1, "charged steps_done"),
        ((*_R, "steps_charged"), -3, "steps must be an integer >= 0"),
        ((*_R, "sigma"), "1.0", "sigma must be float"),
        ((*_R, "q"), 0.0, "q (sampling rate)"),
        ((*_R, "status"), "done", "status"),
        ((*_R, "run_id"), 7, "run_id 7"),
        ((*_R, "examples"), True, "examples must be int"),
        ((*_R, "clip_norm"), _DELETE, "keys must be"),
        ((*_R, "delta"), 1e-7, "below the adapter's delta"),
    ],
)
def test_corrupt_ledger_is_an_error(path: Path, keys: tuple[Any, ...], value: Any,
                                    words: str) -> None:
    doc = _valid_doc(path)
    _set(doc, keys, value)
    path.write_text(json.dumps(doc))
    with pytest.raises(BadTrainingDataError) as exc:
        PrivacyLedger(path)
    assert str(path) in str(exc.value) and words in str(exc.value)
    assert json.loads(path.read_text()) == doc  # never reset
    _assert_unlocked(path)


def _assert_unlocked(path: Path) -> None:
    """The failed open released the ledger's own lock (a held one makes flock fail here)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b"null"])
def test_garbage_ledger_is_an_error(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(BadTrainingDataError, match="privacy ledger"):
        PrivacyLedger(path)
    assert path.read_bytes() == content


def test_a_runs_energy_is_kept_in_its_record_and_checked_when_loaded(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        measured = ledger.begin_run("alice", planned_steps=10, **RUN)
        ledger.end_run(measured, steps_done=10, status="completed", energy_joules=123.5)
        unmeasured = ledger.begin_run("alice", planned_steps=10, **RUN)
        with pytest.raises(ValueError, match="energy_joules"):
            ledger.end_run(unmeasured, steps_done=10, status="completed", energy_joules=-1.0)
        ledger.end_run(unmeasured, steps_done=10, status="completed")  # no power source: no key
    with PrivacyLedger(path) as ledger:  # loads and validates
        first, second = ledger.state("alice").runs
    assert first["energy_joules"] == 123.5 and "energy_joules" not in second
    doc = json.loads(path.read_text())
    doc["adapters"]["alice"]["runs"][0]["energy_joules"] = "lots"
    path.write_text(json.dumps(doc))
    with pytest.raises(BadTrainingDataError, match="energy_joules"):
        PrivacyLedger(path)
