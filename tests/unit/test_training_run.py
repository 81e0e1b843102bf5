"""One training run end to end on a real ORT session: charge before the first step,
checkpoints, cancel, pause, interrupt and resume without double- or under-charging."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lorad.adapters.engine import PreparedAdapter
from lorad.adapters.errors import AdapterDamagedError
from lorad.adapters.service import AdapterService
from lorad.trainer.accountant import RunCharge, epsilon
from lorad.trainer.errors import BadTrainingDataError, PrivacyBudgetExceededError
from lorad.trainer.run import RunControl, RunProgress, TrainerEnv, TrainingRun, last_trained_example
from tests.unit.trainer_helpers import fill_store, inputs, labelled_by, make_env, make_service, run_config, teacher


class _Crash(BaseException):
    """Stands for the process dying: nothing in the run catches it."""


@pytest.fixture
def service(tmp_path: Path) -> AdapterService:
    return make_service(tmp_path)


@pytest.fixture
def env(tmp_path: Path, service: AdapterService) -> Iterator[TrainerEnv]:
    env = make_env(tmp_path, service)
    x = inputs(60, seed=1)
    fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
    yield env
    env.ledger.close()
    env.store.close()


def _reopen(env: TrainerEnv) -> TrainerEnv:
    """A new process: the same files, a new ledger handle."""
    env.ledger.close()
    return make_env(env.state_dir.parent, env.service)


def _only_run(env: TrainerEnv) -> dict:
    (record,) = env.ledger.state("alice").runs
    return record


def test_run_charges_first_trains_and_installs(env: TrainerEnv) -> None:
    seen_at_first_step: list[dict] = []

    def on_step() -> None:
        if not seen_at_first_step:
            seen_at_first_step.append(json.loads((env.state_dir / "privacy-ledger.json").read_text()))

    progress: list[RunProgress] = []
    run = TrainingRun(env, "alice", run_config(), on_progress=progress.append, on_step=on_step)
    run_id = run.begin()
    result = run.execute()

    # The full planned charge was on disk before the first step's update was applied.
    (record,) = seen_at_first_step[0]["adapters"]["alice"]["runs"]
    assert record["steps_charged"] == 12 and record["status"] == "running"

    assert (result.status, result.run_id, result.steps_done, result.version) == ("accepted", run_id, 12, 1)
    final = _only_run(env)
    assert (final["status"], final["steps_charged"], final["steps_done"]) == ("completed", 12, 12)
    # The 12 steps, the private count of the examples (σ 5) and the gate's decision (σ 1).
    assert final["mechanisms"] == [{"what": "example_count", "sigma": 5.0}, {"what": "validation_gate", "sigma": 1.0}]
    expected = epsilon(runs=[RunCharge(q=final["q"], sigma=0.5, steps=12), RunCharge(q=1.0, sigma=5.0, steps=1),
                             RunCharge(q=1.0, sigma=1.0, steps=1)], delta=final["delta"], accountant="rdp")
    assert result.epsilon_spent == pytest.approx(expected)
    assert env.ledger.state("alice").epsilon_spent == pytest.approx(expected)

    stored = env.service.inspect("alice")
    assert stored["meta"]["source"] == "trainer" and stored["meta"]["run_id"] == run_id
    # Nothing computed from the held-out examples is published with the adapter.
    assert not any("score" in k for k in stored["meta"])
    assert [p.steps_done for p in progress if p.phase == "training"][-1] == 12
    assert progress[-1].phase == "done" and progress[-1].epsilon == pytest.approx(expected)
    assert not (env.state_dir / "runs" / "alice").exists()
    # ε so far is what the steps it names cost, queries included (main said 0.0 until the
    # last step of a run shorter than 10 s).
    for p in progress:
        assert p.epsilon_steps <= p.steps_done and p.epsilon > 0
        assert p.epsilon == pytest.approx(epsilon(
            runs=[*([RunCharge(q=final["q"], sigma=0.5, steps=p.epsilon_steps)] if p.epsilon_steps else []),
                  RunCharge(q=1.0, sigma=5.0, steps=1), RunCharge(q=1.0, sigma=1.0, steps=1)],
            delta=final["delta"], accountant="rdp"))


def test_budget_refusal_trains_nothing(env: TrainerEnv) -> None:
    run = TrainingRun(env, "alice", run_config(target_epsilon=0.5, noise_multiplier=0.3))
    with pytest.raises(PrivacyBudgetExceededError, match="would exceed its privacy budget"):
        run.begin()
    assert env.ledger.state("alice").runs == []
    with pytest.raises(RuntimeError, match="begin"):
        run.execute()


def test_a_reset_ledger_is_refused_while_trained_versions_remain(env: TrainerEnv) -> None:
    run = TrainingRun(env, "alice", run_config())
    run.begin()
    assert run.execute().version == 1
    env.ledger.close()
    (env.state_dir / "privacy-ledger.json").unlink()  # the budget must not come back
    fresh = _reopen(env)
    with pytest.raises(BadTrainingDataError, match="version 1 was trained here in run 1, which the privacy ledger"):
        TrainingRun(fresh, "alice", run_config()).begin()
    assert fresh.ledger.state("alice").runs == []
    fresh.ledger.close()


def test_calibrated_sigma_fits_the_budget(env: TrainerEnv) -> None:
    run = TrainingRun(env, "alice", run_config(noise_multiplier=None, target_epsilon=4.0, gate_noise_multiplier=4.0))
    run.begin()
    assert run.plan is not None and run.plan.sigma > 0.5
    assert env.ledger.state("alice").epsilon_spent <= 4.0


def test_cancel_charges_steps_done_and_releases_nothing(env: TrainerEnv) -> None:
    control = RunControl()
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 3:
            control.cancel()

    run = TrainingRun(env, "alice", run_config(), control=control, on_step=on_step)
    run.begin()
    result = run.execute()
    assert (result.status, result.steps_done) == ("cancelled", 3)
    record = _only_run(env)
    assert (record["status"], record["steps_charged"]) == ("cancelled", 3)
    assert env.service.registry.current_version("alice") is None


def test_pause_holds_between_steps(env: TrainerEnv) -> None:
    control = RunControl()
    progress: list[RunProgress] = []
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 2:
            control.pause()
            threading.Timer(0.3, control.resume).start()

    run = TrainingRun(env, "alice", run_config(), control=control, on_step=on_step, on_progress=progress.append)
    run.begin()
    assert run.execute().status == "accepted"
    paused = [p for p in progress if p.phase == "paused"]
    assert paused and paused[0].steps_done == 2


def test_interrupt_then_resume_charges_once(env: TrainerEnv) -> None:
    control = RunControl()
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 7:
            control.interrupt()

    first = TrainingRun(env, "alice", run_config(), control=control, on_step=on_step)
    run_id = first.begin()
    result = first.execute()
    assert (result.status, result.steps_done) == ("interrupted", 7)
    record = _only_run(env)
    # Still charged in full, progress noted after the checkpoint was written.
    assert (record["status"], record["steps_charged"], record["steps_done"]) == ("running", 12, 7)

    env2 = _reopen(env)
    try:
        progress: list[RunProgress] = []
        second = TrainingRun(env2, "alice", run_config(noise_multiplier=2.0), on_progress=progress.append)
        assert second.begin() == run_id and second.resumed
        # The ledger's σ, not today's config, is what the resumed steps use.
        assert second.plan is not None and second.plan.sigma == 0.5
        result = second.execute()
        assert result.status == "accepted" and result.steps_done == 12
        assert progress[0].steps_done == 7
        record = _only_run(env2)
        assert (record["status"], record["steps_charged"]) == ("completed", 12)
    finally:
        env2.ledger.close()
        env2.store.close()


def test_crash_after_checkpoint_resumes_from_it(env: TrainerEnv) -> None:
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 8:  # checkpoint at 5; steps 6-8 are lost with the process
            raise _Crash()

    run = TrainingRun(env, "alice", run_config(), on_step=on_step)
    run_id = run.begin()
    with pytest.raises(_Crash):
        run.execute()
    record = _only_run(env)
    assert (record["status"], record["steps_charged"], record["steps_done"]) == ("running", 12, 5)

    env2 = _reopen(env)
    try:
        progress: list[RunProgress] = []
        again = TrainingRun(env2, "alice", run_config(), on_progress=progress.append)
        assert again.begin() == run_id
        result = again.execute()
        assert progress[0].steps_done == 5
        assert result.status == "accepted"
        assert len(env2.ledger.state("alice").runs) == 1
    finally:
        env2.ledger.close()
        env2.store.close()


@pytest.mark.parametrize("content", [b"{", b"\xff\xfe", b"[]", b'{"run_id": "1"}'])
def test_damaged_run_state_is_absent_and_never_lowers_the_charge(
        env: TrainerEnv, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged run.json reads as "no local state", with a warning: the interrupted run
    restarts at step 0 under the charge the ledger already holds (never charged again, never less)."""
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 7:  # checkpoint at 5
            raise _Crash()

    run = TrainingRun(env, "alice", run_config(), on_step=on_step)
    run_id = run.begin()
    with pytest.raises(_Crash):
        run.execute()
    run_dir = env.state_dir / "runs" / "alice"
    (run_dir / "run.json").write_bytes(content)
    charged = env.ledger.state("alice").epsilon_spent
    progress: list[RunProgress] = []
    again = TrainingRun(env, "alice", run_config(), on_progress=progress.append)
    with caplog.at_level("WARNING", logger="lorad.trainer.run"):
        assert again.begin() == run_id  # the same charged run, not a new one
    assert f"{run_dir / 'run.json'} is damaged" in caplog.text
    assert env.ledger.state("alice").epsilon_spent == charged
    assert again.execute().status == "accepted"
    assert progress[0].steps_done == 0  # its checkpoint went with the damaged state
    record = _only_run(env)
    assert (record["run_id"], record["status"], record["steps_charged"]) == (run_id, "completed", 12)
    assert env.ledger.state("alice").epsilon_spent >= charged


def test_crash_right_after_begin_resumes_the_same_charge(env: TrainerEnv) -> None:
    run_id = TrainingRun(env, "alice", run_config()).begin()
    (env.state_dir / "runs" / "alice" / "run.json").unlink()  # crashed before writing local state
    again = TrainingRun(env, "alice", run_config())
    assert again.begin() == run_id
    assert again.execute().status == "accepted"
    record = _only_run(env)
    assert (record["run_id"], record["steps_charged"]) == (run_id, 12)


class _CrashingInstall:
    """The adapter service, but the daemon dies when the run installs its version."""

    def __init__(self, real: AdapterService) -> None:
        self.real = real

    def __getattr__(self, name: str) -> object:
        if name == "install":
            raise _Crash()
        return getattr(self.real, name)


def _trained_not_released(env: TrainerEnv) -> int:
    crashing = TrainerEnv(**{**env.__dict__, "service": _CrashingInstall(env.service)})  # type: ignore[arg-type]
    run = TrainingRun(crashing, "alice", run_config(validation_margin=-10.0))
    run_id = run.begin()
    with pytest.raises(_Crash):
        run.execute()
    assert _only_run(env)["status"] == "completed"
    return run_id


def test_crash_between_end_run_and_install_finishes_without_training(env: TrainerEnv) -> None:
    run_id = _trained_not_released(env)
    steps = [0]
    finish = TrainingRun(env, "alice", run_config(), on_step=lambda: steps.__setitem__(0, steps[0] + 1))
    assert finish.begin() == run_id
    result = finish.execute()
    assert (result.status, steps[0]) == ("accepted", 0)
    assert len(env.ledger.state("alice").runs) == 1


def test_damaged_state_of_a_trained_run_keeps_its_charge(env: TrainerEnv) -> None:
    run_id = _trained_not_released(env)
    (env.state_dir / "runs" / "alice" / "run.json").write_bytes(b"{")
    charged = env.ledger.state("alice").epsilon_spent
    new_run = TrainingRun(env, "alice", run_config())
    assert new_run.begin() != run_id  # the trained run is not released; its charge stays
    first, _ = env.ledger.state("alice").runs
    assert (first["run_id"], first["status"], first["steps_charged"]) == (run_id, "completed", 12)
    assert env.ledger.state("alice").epsilon_spent > charged
    assert new_run.execute().status == "accepted"


def test_rank_above_slot_rank_is_refused_before_charging(env: TrainerEnv) -> None:
    with pytest.raises(ValueError, match="slot rank"):
        TrainingRun(env, "alice", run_config(rank=16)).begin()
    assert env.ledger.state("alice").runs == []


def test_unfit_examples_are_skipped(env: TrainerEnv) -> None:
    env.store.add("alice", {"x": np.zeros((3, 3), np.float32)}, np.asarray(1))
    run = TrainingRun(env, "alice", run_config(batch_size=None, sampling_rate=1.0, steps=2))
    run.begin()
    assert run.execute().status == "accepted"


def test_isolated_process_trains_the_same_as_in_process(tmp_path: Path) -> None:
    """The stepper in a child process (the production path) gives the same adapter, step
    for step, as in process with the same seeded noise and sampling."""
    # Not 0: the seed must reach the child, not coincide with a default there.
    seed = 20240917
    env = make_env(tmp_path / "in-process", make_service(tmp_path / "in-process"), seed=seed)
    x = inputs(60, seed=1)
    fill_store(env.store, "alice", x, labelled_by(env.service, teacher(env.service), x))
    in_process = TrainingRun(env, "alice", run_config(validation_margin=-1e9))
    in_process.begin()
    assert in_process.execute().status == "accepted"
    expected = env.service.inspect("alice")
    env.ledger.close()
    env.store.close()

    other = make_service(tmp_path / "other")
    isolated_env = make_env(tmp_path / "other", other, seed=seed, isolate=True)
    try:
        x = inputs(60, seed=1)
        fill_store(isolated_env.store, "alice", x, labelled_by(other, teacher(other), x))
        run = TrainingRun(isolated_env, "alice", run_config(validation_margin=-1e9))
        run.begin()
        assert run.execute().status == "accepted"
        a = env.service.cache.lease
        with a("alice") as mine, other.cache.lease("alice") as theirs:
            for name, w in mine.adapter.weights.items():
                np.testing.assert_allclose(theirs.adapter.weights[name].B, w.B, rtol=0, atol=1e-6)
        assert other.inspect("alice")["meta"]["run_id"] == expected["meta"]["run_id"]
    finally:
        isolated_env.ledger.close()
        isolated_env.store.close()


def test_cancel_while_validating_releases_nothing_and_keeps_the_charge(env: TrainerEnv) -> None:
    control = RunControl()

    class _CancelDuringGate:
        """The serving side, with a cancel arriving while the gate scores."""

        def __init__(self, real: AdapterService) -> None:
            self.real = real

        def run(self, tensors: object, adapter: object = None) -> object:
            if isinstance(adapter, PreparedAdapter):  # the gate scoring the candidate
                control.cancel()
            return self.real.run(tensors, adapter)  # type: ignore[arg-type]

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    cancelling = TrainerEnv(**{**env.__dict__, "service": _CancelDuringGate(env.service)})  # type: ignore[arg-type]
    run = TrainingRun(cancelling, "alice", run_config(), control=control)
    run.begin()
    result = run.execute()
    assert result.status == "cancelled" and "before release" in result.reason
    assert env.service.registry.current_version("alice") is None
    record = _only_run(env)
    assert (record["status"], record["steps_charged"]) == ("completed", 12)  # the charge stays


def test_damaged_adapter_record_counts_every_example_as_new(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "adapters" / "alice.json"
    path.parent.mkdir()
    path.write_text('{"last_example_id": 7}')
    assert last_trained_example(tmp_path, "alice") == 7
    with caplog.at_level("WARNING", logger="lorad.trainer.run"):
        for content in (b"{", b"[]", b'{"last_example_id": "7"}'):
            path.write_bytes(content)
            assert last_trained_example(tmp_path, "alice") is None
            assert last_trained_example(tmp_path, "alice") is None  # read at every check: warned once
    assert caplog.text.count(f"{path} is damaged") == 3


def test_a_damaged_adapter_is_not_trained_or_charged(env: TrainerEnv) -> None:
    env.service.install("alice", teacher(env.service))
    (env.service.registry.root / "alice" / "current").write_bytes(b"garbage")
    with pytest.raises(AdapterDamagedError, match="repair it"):
        TrainingRun(env, "alice", run_config()).begin()
    assert env.ledger.state("alice").runs == []
