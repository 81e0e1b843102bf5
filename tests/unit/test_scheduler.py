"""The background scheduler: one run at a time, manual and automatic starts, controls,
resume at start, and yielding to serving (a structural check: thread priorities)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorad.trainer.config import PolicyConfig, parse_trainer_section
from lorad.trainer.errors import PrivacyBudgetExceededError
from lorad.trainer.policy import Decision, SystemProbe, TrainingPolicy
from lorad.trainer.run import RunControl, RunProgress, RunResult
from lorad.trainer.scheduler import TrainingConflictError, TrainingScheduler
from lorad.trainer.service import TrainerService
from tests.unit.trainer_helpers import inputs, labelled_by, make_service, teacher


class _Plan:
    steps = 5


class _FakeRun:
    """Duck-typed TrainingRun: steps until told otherwise, honouring the control."""

    next_id = 1

    def __init__(self, adapter: str, control: RunControl, progress: Callable[[RunProgress], None],
                 between: Callable[[], None], *, gate: threading.Event, refuse: bool, fail: bool = False) -> None:
        self.adapter, self.control, self.progress, self.between = adapter, control, progress, between
        self.gate, self.refuse, self.fail = gate, refuse, fail
        self.run_id: int | None = None
        self.plan = _Plan()
        self.resumed = False
        self.thread_tid: int | None = None

    def begin(self) -> int:
        if self.refuse:
            raise PrivacyBudgetExceededError(self.adapter, spent_epsilon=1, requested_epsilon=2, budget_epsilon=1)
        self.run_id = _FakeRun.next_id
        _FakeRun.next_id += 1
        return self.run_id

    def execute(self) -> RunResult:
        assert self.run_id is not None
        self.thread_tid = threading.get_native_id()
        if self.fail:
            return RunResult(self.adapter, self.run_id, "failed", 0, 5, "training step 1 failed: boom")
        steps = 0
        while steps < 5:
            if self.control.cancelled:
                return RunResult(self.adapter, self.run_id, "cancelled", steps, 5, "cancelled")
            if self.control.interrupted:
                return RunResult(self.adapter, self.run_id, "interrupted", steps, 5, "interrupted")
            if not self.control.wait_running(0.05) or not self.gate.wait(0.02):
                continue
            steps += 1
            self.between()
            self.progress(RunProgress(self.adapter, self.run_id, "training", steps, 5, 0.1 * steps))
        return RunResult(self.adapter, self.run_id, "accepted", 5, 5, "ok", 1, 0.5)


class _Harness:
    def __init__(self, tmp_path: Path, *, device_ok: bool = True, ready: tuple[str, ...] = (),
                 interrupted: tuple[str, ...] = (), auto: bool = True, refuse: tuple[str, ...] = (),
                 fail: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.runs: list[_FakeRun] = []
        self.results: list[RunResult] = []
        self.device_ok = device_ok
        self.ready = set(ready)
        (tmp_path / "proc").mkdir(exist_ok=True)
        policy = TrainingPolicy(PolicyConfig(), probe=SystemProbe(proc_root=tmp_path / "proc", sys_root=tmp_path,
                                                                  cpu_count=1))
        policy.device = lambda: Decision.of([] if self.device_ok else ["busy"])  # type: ignore[method-assign]
        done = threading.Condition()
        self.done = done

        def make_run(adapter: str, control: RunControl, progress: Callable[[RunProgress], None],
                     between: Callable[[], None]) -> _FakeRun:
            run = _FakeRun(adapter, control, progress, between, gate=self.gate, refuse=adapter in refuse,
                           fail=adapter in fail)
            self.runs.append(run)
            return run

        def on_result(result: RunResult) -> None:
            with done:
                self.results.append(result)
                done.notify_all()

        self.scheduler = TrainingScheduler(
            make_run=make_run, policy=policy, candidates=lambda: ["alice", "bob", "carol"],  # type: ignore[arg-type]
            adapter_ready=lambda a: Decision.of([] if a in self.ready else ["not enough examples"]),
            interrupted=lambda: interrupted, interval_s=0.05, niceness=7, auto=auto, on_result=on_result,
            clock=clock,
        )

    def wait_results(self, n: int, timeout: float = 5.0) -> list[RunResult]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.results) >= n, timeout), self.scheduler.status()
        return self.results


@pytest.fixture
def harness_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[_Harness] = []

    def make(**kw: object) -> _Harness:
        h = _Harness(tmp_path, **kw)  # type: ignore[arg-type]
        made.append(h)
        return h

    yield make
    for h in made:
        h.gate.set()
        h.scheduler.stop(5)


def test_manual_trigger_runs_on_a_lower_priority_thread(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(auto=False)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    h.scheduler.start()
    run_id = h.scheduler.trigger("alice")
    (result,) = h.wait_results(1)
    assert (result.run_id, result.status) == (run_id, "accepted")
    worker = h.runs[0].thread_tid
    assert worker is not None and worker == h.scheduler.worker_tid and worker != threading.get_native_id()
    assert os.getpriority(os.PRIO_PROCESS, worker) == max(7, mine)
    # Per-thread: the caller's (serving's) priority did not change.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    assert h.scheduler.adapter_status("alice")["status"] == "accepted"  # type: ignore[index]


def test_one_run_per_adapter_and_budget_refusal(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(auto=False, refuse=("bob",))
    h.gate.clear()
    h.scheduler.start()
    h.scheduler.trigger("alice")
    with pytest.raises(TrainingConflictError, match="alice"):
        h.scheduler.trigger("alice")
    with pytest.raises(PrivacyBudgetExceededError):
        h.scheduler.trigger("bob")
    assert h.scheduler.adapter_status("bob") is None
    h.gate.set()
    h.wait_results(1)


def test_pause_resume_cancel(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(auto=False)
    h.scheduler.start()
    h.scheduler.pause()
    h.scheduler.trigger("alice")
    time.sleep(0.2)
    # Paused: the queued run does not start.
    assert h.results == [] and h.scheduler.status()["queued"][0]["adapter"] == "alice"
    h.scheduler.resume()
    h.wait_results(1)
    h.gate.clear()
    h.scheduler.trigger("bob")
    assert h.scheduler.cancel("bob")
    h.gate.set()
    results = h.wait_results(2)
    assert results[1].status == "cancelled"
    assert not h.scheduler.cancel("nobody")


def test_automatic_runs_follow_the_policy(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(device_ok=False, ready=("bob",))
    h.scheduler.start()
    time.sleep(0.3)
    assert h.results == []
    assert h.scheduler.status()["blocked"] == {"device": ["busy"]}
    h.device_ok = True
    h.scheduler.check_now()
    (result,) = h.wait_results(1)
    assert result.adapter == "bob"
    assert h.scheduler.status()["blocked"]["alice"] == ["not enough examples"]


def test_automatic_run_waits_while_the_device_is_busy(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(ready=("alice",))
    h.gate.clear()
    h.scheduler.start()
    deadline = time.monotonic() + 5
    while not h.runs and time.monotonic() < deadline:
        time.sleep(0.01)
    h.ready.clear()
    h.device_ok = False
    time.sleep(0.1)  # past the check interval: the next step boundary asks the policy
    h.gate.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        current = h.scheduler.status()["current"]
        if current and current["waiting_for"] == ["busy"]:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the run did not wait: {h.scheduler.status()}")
    assert h.results == []
    h.device_ok = True
    assert h.wait_results(1)[0].status == "accepted"


def test_stop_interrupts_and_start_resumes(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory(auto=False)
    h.scheduler.start()
    h.gate.clear()
    h.scheduler.trigger("alice")
    time.sleep(0.1)
    h.scheduler.stop(5)
    assert h.results[0].status == "interrupted"

    again = harness_factory(auto=False, interrupted=("alice",))
    again.scheduler.start()
    assert again.wait_results(1)[0].adapter == "alice"
    with pytest.raises(RuntimeError, match="already started"):
        again.scheduler.start()


def _new_thread_nices(before: set[str]) -> dict[int, int]:
    nices = {}
    for name in set(os.listdir("/proc/self/task")) - before:
        try:
            nices[int(name)] = os.getpriority(os.PRIO_PROCESS, int(name))
        except OSError:
            continue  # the thread ended meanwhile
    return nices


def test_training_yields_to_serving(tmp_path: Path) -> None:
    """While this thread serves, the DP steps run in a child process at nice >= 10 in
    SCHED_IDLE, every thread training added here runs at nice >= 10, and serving keeps its
    priority and keeps answering (structural properties, not timings)."""
    service = make_service(tmp_path)
    (tmp_path / "proc").mkdir()
    config = parse_trainer_section({
        "testing": True, "noise": "seeded", "schedule": False, "niceness": 10,
        "defaults": {"rank": 4, "alpha": 8, "noise_multiplier": 1.0, "batch_size": 8, "steps": 30,
                     "epochs": None, "target_epsilon": 100, "validation_margin": -100, "learning_rate": 0.01,
                     "min_train_examples": 1, "min_holdout_examples": 1, "gate_noise_multiplier": 1.0,
                     "budget_fraction": 1.0},
    })
    assert config.isolate and config.sched_idle and config.intra_op_threads == 1
    trainer = TrainerService(config, adapters=service, state_dir=tmp_path, proc_root=tmp_path / "proc",
                             sys_root=tmp_path)
    try:
        x = inputs(64, seed=2)
        for row, label in zip(x, labelled_by(service, teacher(service), x), strict=True):
            trainer.add_example("alice", {"x": row[None]}, int(label))
        serving_tid = threading.get_native_id()
        serving_nice = os.getpriority(os.PRIO_PROCESS, serving_tid)
        # The accountant's scipy starts OpenBLAS's thread pool in whichever thread imports it
        # first; imported here (as any earlier test in the session does), it is not counted
        # among the threads training adds.
        import scipy.linalg  # noqa: F401

        before = set(os.listdir("/proc/self/task"))
        trainer.start()
        trainer.trigger("alice")
        threads: dict[int, int] = {}
        children: dict[int, tuple[int, int]] = {}
        served_during_training = 0
        feeds = {"x": inputs(1, seed=9)}
        deadline = time.monotonic() + 60
        while trainer.run_status("alice")["state"] != "finished" and time.monotonic() < deadline:
            service.infer(feeds)
            time.sleep(0.002)  # an interactive load, not a saturating one: SCHED_IDLE needs spare CPU
            if trainer.run_status("alice").get("phase") == "training":
                served_during_training += 1
                threads.update(_new_thread_nices(before))
                for child in multiprocessing.active_children():
                    if child.name == "lorad-trainer-step" and child.pid is not None:
                        try:
                            children[child.pid] = (os.getpriority(os.PRIO_PROCESS, child.pid),
                                                   os.sched_getscheduler(child.pid))
                        except OSError:
                            continue  # it ended meanwhile
        assert trainer.run_status("alice")["status"] == "accepted"
        assert children, "the steps did not run in a child process"
        assert all(nice >= 10 and policy == os.SCHED_IDLE for nice, policy in children.values()), children
        assert trainer.scheduler.worker_tid in threads
        assert min(threads.values()) >= max(10, serving_nice), threads
        assert os.getpriority(os.PRIO_PROCESS, serving_tid) == serving_nice
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        assert served_during_training > 0
    finally:
        trainer.close()
        trainer.close()


def test_a_failed_run_backs_off_instead_of_starting_again(harness_factory) -> None:  # type: ignore[no-untyped-def]
    now = [100.0]
    h = harness_factory(ready=("carol",), fail=("carol",), clock=lambda: now[0])
    h.scheduler.start()
    (first,) = h.wait_results(1)
    assert first.status == "failed"
    h.scheduler.check_now()  # the next check: carol is due by the policy, but backs off
    deadline = time.monotonic() + 5
    while "backing off" not in " ".join(h.scheduler.status()["blocked"].get("carol", [])):
        assert time.monotonic() < deadline, h.scheduler.status()
        time.sleep(0.01)
    assert len(h.runs) == 1  # not started again: its charge would be spent for the same failure
    backoff = h.scheduler.status()["backoff"]["carol"]
    assert backoff["failures"] == 1 and "boom" in backoff["reason"] and backoff["run_id"] == first.run_id
    assert h.scheduler.adapter_status("carol")["backoff"]["failures"] == 1  # type: ignore[index]
    assert h.scheduler.backing_off() == 1
    now[0] += 1.0  # past the back-off: one more try, and twice as long a wait after it
    h.scheduler.check_now()
    second = h.wait_results(2)[1]
    assert second.status == "failed" and h.scheduler.status()["backoff"]["carol"]["failures"] == 2
    # A manual run is the user's decision: not held back.
    run_id = h.scheduler.trigger("carol")
    assert h.runs[-1].adapter == "carol" and h.runs[-1].run_id == run_id
