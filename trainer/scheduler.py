"""The background scheduler: one training run at a time, below serving's priority.

One worker thread owns all training. Priority: Linux keeps a nice value per thread
(``setpriority(PRIO_PROCESS, tid, n)`` on a thread id changes that thread only, and
threads it creates inherit it), so the worker renices itself and serving threads keep
theirs; the training sessions run with ``intra_op_num_threads=1`` (work stays on this
thread, no pool threads at normal priority) and ``allow_spinning=0`` (no busy-waiting
on the two cores serving shares). Optionally the worker uses ``SCHED_IDLE``, which
runs it only when no other thread wants the CPU.

Automatic runs start when :class:`lorad.trainer.policy.TrainingPolicy` allows (device idle,
window, power, heat; then per adapter: enough new examples, budget left) and are held
between steps while the device stops being idle. Manual runs (:meth:`trigger`) skip the
policy except the privacy budget, which ``TrainingRun.begin`` enforces. Runs a previous
process left interrupted are resumed first, at start.

A run that failed (its charge stands) is not started again automatically at the next
check: the adapter backs off, ``interval × 2^(failures-1)`` up to a day, and the reason
shows in :meth:`TrainingScheduler.status` (``backoff``), in the adapter's run status and
in ``lorad_training_backoff_adapters``. A run that ends otherwise, or a manual run that
starts, ends the back-off.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from .policy import Decision, TrainingPolicy
from .run import RunControl, RunProgress, RunResult, TrainingRun

__all__ = ["Job", "Backoff", "TrainingScheduler", "TrainingConflictError", "lower_thread_priority", "MAX_BACKOFF_S"]

_log = logging.getLogger(__name__)

#: Longest back-off after repeated failed runs of one adapter.
MAX_BACKOFF_S = 24 * 3600.0

#: Builds a not-yet-begun run for an adapter with the given control and hooks.
RunFactory = Callable[[str, RunControl, Callable[[RunProgress], None], Callable[[], None]], TrainingRun]


class TrainingConflictError(RuntimeError):
    """The adapter already has a run queued or in progress."""


def lower_thread_priority(niceness: int, *, idle_class: bool = False) -> int:
    """Renice the calling thread only (Linux: per-thread nice values); returns its id."""
    tid = threading.get_native_id()
    # Only ever lower the priority: raising it again needs CAP_SYS_NICE.
    os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
    if idle_class and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    return tid


@dataclass
class Job:
    adapter: str
    run: TrainingRun
    control: RunControl
    manual: bool
    progress: RunProgress | None = None
    waiting: tuple[str, ...] = ()
    #: How the run ended, for a caller that waits on it (a federated round's HTTP request).
    finished: Future[RunResult] = field(default_factory=Future)

    def describe(self) -> dict[str, Any]:
        p = self.progress
        return {
            "adapter": self.adapter, "run_id": self.run.run_id, "manual": self.manual,
            "resumed": self.run.resumed, "paused": self.control.paused, "waiting_for": list(self.waiting),
            "phase": p.phase if p else "queued", "steps_done": p.steps_done if p else 0,
            "planned_steps": p.planned_steps if p else (self.run.plan.steps if self.run.plan else None),
            "epsilon": p.epsilon if p else None,
            "epsilon_steps": p.epsilon_steps if p else None,
        }


@dataclass(frozen=True)
class Backoff:
    """Automatic runs of an adapter wait after ``failures`` failed runs in a row."""

    failures: int
    until: float
    reason: str
    run_id: int

    def describe(self, now: float) -> dict[str, Any]:
        return {"failures": self.failures, "retry_in_s": max(0.0, self.until - now), "reason": self.reason,
                "run_id": self.run_id}


class TrainingScheduler:
    """Owns the worker thread; thread-safe controls for the service and the HTTP API."""

    def __init__(
        self,
        *,
        make_run: RunFactory,
        policy: TrainingPolicy,
        candidates: Callable[[], Iterable[str]],
        adapter_ready: Callable[[str], Decision],
        interrupted: Callable[[], Iterable[str]] = lambda: (),
        interval_s: float = 60.0,
        niceness: int = 10,
        idle_class: bool = False,
        auto: bool = True,
        on_result: Callable[[RunResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_run = make_run
        self._policy = policy
        self._candidates = candidates
        self._adapter_ready = adapter_ready
        self._interrupted = interrupted
        self._interval = interval_s
        self._niceness = niceness
        self._idle_class = idle_class
        self._auto = auto
        self._on_result = on_result
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._last: dict[str, RunResult] = {}
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_check = -float("inf")
        self._blocked: dict[str, list[str]] = {}
        self._backoff: dict[str, Backoff] = {}
        self._reserved: set[str] = set()
        #: Native id of the worker thread once it runs (tests inspect its priority).
        self.worker_tid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the training scheduler is already started")
        self._thread = threading.Thread(target=self._work, name="lorad-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt the current run at its next step (it checkpoints and resumes at the
        next start) and join the worker; safe to call twice."""
        with self._cond:
            self._stopping = True
            for job in [*self._queue, *([self._current] if self._current else [])]:
                job.control.interrupt()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                _log.error("the training thread did not stop within %.0f s", timeout)
        with self._cond:
            for job in self._queue:  # begun, never executed: they resume at the next start
                if not job.finished.done():
                    job.finished.set_exception(RuntimeError("the trainer stopped before the run started"))

    # -- controls ----------------------------------------------------------------------------

    def trigger(self, adapter: str) -> int:
        """Begin a manual run now (charging the ledger) and queue it; returns its run id.
        A manual run is the user's decision: it is not held by a back-off."""
        job = self._reserve_and_begin(adapter, manual=True)
        with self._cond:
            self._queue.appendleft(job)
            self._cond.notify_all()
        assert job.run.run_id is not None
        return job.run.run_id

    def submit(self, adapter: str, make_run: RunFactory) -> Job:
        """Begin a run made by ``make_run`` (charging the ledger) and queue it behind the
        manual ones; it is held between steps while the device is busy, as an automatic
        run is. Wait on ``job.finished`` for its result (a federated round)."""
        job = self._reserve_and_begin(adapter, manual=False, make_run=make_run)
        with self._cond:
            if self._stopping:
                job.control.interrupt()
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def pause(self) -> None:
        """Hold the current run between steps and start no new one."""
        with self._cond:
            self._paused = True
            if self._current is not None:
                self._current.control.pause()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            for job in [*self._queue, *([self._current] if self._current else [])]:
                job.control.resume()
            self._cond.notify_all()

    def cancel(self, adapter: str) -> bool:
        """Cancel the adapter's queued or running run; False when it has none."""
        with self._cond:
            for job in [*self._queue, *([self._current] if self._current else [])]:
                if job.adapter == adapter:
                    job.control.cancel()
                    self._cond.notify_all()
                    return True
        return False

    def check_now(self) -> None:
        """Evaluate the policy at the next opportunity instead of after the interval."""
        with self._cond:
            self._last_check = -float("inf")
            self._cond.notify_all()

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "running": self._thread is not None and self._thread.is_alive(),
                "paused": self._paused,
                "automatic": self._auto,
                "current": self._current.describe() if self._current else None,
                "queued": [j.describe() for j in self._queue],
                "blocked": {k: list(v) for k, v in self._blocked.items()},
                "backoff": {k: b.describe(self._clock()) for k, b in self._backoff.items()},
                "last": {k: asdict(r) for k, r in self._last.items()},
            }

    def adapter_status(self, adapter: str) -> dict[str, Any] | None:
        """The adapter's queued or running job, else its last result (None: none seen)."""
        with self._cond:
            for job in [*([self._current] if self._current else []), *self._queue]:
                if job.adapter == adapter:
                    return {"state": "running" if job is self._current else "queued", **job.describe()}
            last = self._last.get(adapter)
            if last is None:
                return None
            backoff = self._backoff.get(adapter)
            extra = {"backoff": backoff.describe(self._clock())} if backoff is not None else {}
            return {"state": "finished", **asdict(last), **extra}

    # -- worker ------------------------------------------------------------------------------

    def _reserve_and_begin(self, adapter: str, *, manual: bool, make_current: bool = False,
                           make_run: RunFactory | None = None) -> Job:
        """Begin a run outside the lock (planning may calibrate σ for seconds) while a
        reservation keeps a second begin of the same adapter, and so a second charge, out."""
        with self._cond:
            for other in [*self._queue, *([self._current] if self._current else [])]:
                if other.adapter == adapter:
                    raise TrainingConflictError(
                        f"adapter {adapter!r} already has training run {other.run.run_id} "
                        f"{'in progress' if other is self._current else 'queued'}; cancel it first or wait")
            if adapter in self._reserved:
                raise TrainingConflictError(f"adapter {adapter!r} is being planned right now; try again")
            self._reserved.add(adapter)
        job: Job | None = None
        try:
            job = self._begin(adapter, manual=manual, make_run=make_run)
            return job
        finally:
            with self._cond:
                self._reserved.discard(adapter)
                if make_current and job is not None:
                    if self._stopping:
                        job.control.interrupt()
                    self._current = job

    def _begin(self, adapter: str, *, manual: bool, make_run: RunFactory | None = None) -> Job:
        # An automatic run must fit its time window (TrainingRun checks, before charging).
        control = RunControl(time_left_s=None if manual else self._policy.time_left_s(),
                             slowdown=self._policy.slowdown())
        holder: list[Job] = []

        def progress(p: RunProgress) -> None:
            if holder:
                holder[0].progress = p

        def between_steps() -> None:
            if holder:
                self._hold_while_busy(holder[0])

        run = (make_run or self._make_run)(adapter, control, progress, between_steps)
        run.begin()  # may raise PrivacyBudgetExceededError / ValueError: nothing queued
        job = Job(adapter, run, control, manual)
        holder.append(job)
        return job

    def _hold_while_busy(self, job: Job) -> None:
        """Automatic runs wait between steps while the device is not idle enough."""
        if job.manual or self._clock() - self._last_check < self._interval:
            return
        decision = self._policy.device()
        self._last_check = self._clock()
        while not decision.allowed and not (job.control.cancelled or job.control.interrupted):
            job.waiting = decision.reasons
            with self._cond:
                self._cond.wait(self._interval)
            decision = self._policy.device()
        job.waiting = ()

    def _work(self) -> None:
        self.worker_tid = lower_thread_priority(self._niceness, idle_class=self._idle_class)
        self._resume_interrupted()
        while True:
            with self._cond:
                if self._stopping:
                    return
                job = self._queue.popleft() if self._queue and not self._paused else None
                # Set under the same lock as the pop, so the adapter is never in neither place.
                self._current = job
                automatic = job is None and self._auto and not self._paused and self._due()
                if job is None and not automatic:
                    self._cond.wait(self._wait_time())
                    continue
            if job is None:
                # _reserve_and_begin keeps the adapter reserved until it is current.
                job = self._pick_automatic()
                if job is None:
                    continue
            try:
                result = job.run.execute()
            except Exception as e:  # a bug must not kill the scheduler; execute() closes the ledger itself
                _log.exception("training run of adapter %r crashed", job.adapter)
                assert job.run.run_id is not None
                result = RunResult(job.adapter, job.run.run_id, "failed", 0, 0, f"internal error: {e}")
            _log.info("adapter %r: training run %d %s (%s)", job.adapter, result.run_id, result.status, result.reason)
            if self._on_result is not None:  # counted before anyone can see the run finished
                self._on_result(result)
            with self._cond:
                self._current = None
                self._last[job.adapter] = result
                self._note_outcome(job.adapter, result)
            job.finished.set_result(result)

    def _note_outcome(self, adapter: str, result: RunResult) -> None:
        """Back off after a failed run; any other ending clears it (lock held)."""
        if result.status != "failed":
            self._backoff.pop(adapter, None)
            return
        failures = self._backoff[adapter].failures + 1 if adapter in self._backoff else 1
        wait = min(MAX_BACKOFF_S, self._interval * 2 ** (failures - 1))
        self._backoff[adapter] = Backoff(failures, self._clock() + wait, result.reason, result.run_id)
        _log.warning("adapter %r: run %d failed (%s); no automatic run for %.0f s (%d failed in a row)",
                     adapter, result.run_id, result.reason, wait, failures)

    def backing_off(self) -> int:
        """How many adapters wait after failed runs now."""
        with self._cond:
            now = self._clock()
            return sum(1 for b in self._backoff.values() if b.until > now)

    def _resume_interrupted(self) -> None:
        for adapter in self._interrupted():
            if self._stopping:
                return
            try:
                job = self._reserve_and_begin(adapter, manual=True)
            except Exception as e:
                _log.error("adapter %r: could not resume the interrupted run: %s", adapter, e)
                continue
            with self._cond:
                self._queue.append(job)

    def _due(self) -> bool:
        return self._clock() - self._last_check >= self._interval

    def _wait_time(self) -> float:
        if not self._auto:
            return self._interval
        return max(0.05, self._interval - (self._clock() - self._last_check))

    def _pick_automatic(self) -> Job | None:
        self._last_check = self._clock()
        device = self._policy.device()
        blocked = {} if device.allowed else {"device": list(device.reasons)}
        job = None
        if device.allowed:
            for adapter in sorted(set(self._candidates())):
                backoff = self._backoff.get(adapter)
                if backoff is not None and backoff.until > self._clock():
                    blocked[adapter] = [f"backing off after failed run {backoff.run_id} ({backoff.reason}); next "
                                        f"automatic try in {backoff.until - self._clock():.0f} s"]
                    continue
                decision = self._adapter_ready(adapter)
                if not decision.allowed:
                    blocked[adapter] = list(decision.reasons)
                    continue
                try:
                    job = self._reserve_and_begin(adapter, manual=False, make_current=True)
                    break
                except Exception as e:  # budget refused, a bad plan, a manual run of it: skip it this round
                    blocked[adapter] = [str(e)]
        with self._cond:
            self._blocked = blocked
        return job
