"""A process killed (SIGKILL) at every write of the privacy ledger never under-counts.

The child trains a fake run (begin, steps, progress notes, end) and is killed at one
write point — before a write, after it, or in the middle of it (temp file written and
fsynced, not yet renamed). It appends every step it finished to a side file with
``os.write``, which the kernel keeps across the kill. The parent then reopens the ledger
and checks: it loads (never torn), and its ε is at least the ε of the steps really done.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from lorad.trainer.accountant import RunCharge, epsilon
from lorad.trainer.ledger import PrivacyLedger

Q, SIGMA, DELTA = 0.05, 1.0, 1e-5
PLANNED, DONE = 100, 70
PROGRESS_AT = (30, 60)
EARLIER = RunCharge(q=0.02, sigma=1.5, steps=50)  # a completed run from before a restart

# Every write a run makes, in order; a point is (hook name or "mid-write", nth write).
_WRITES = ["begin_run", "record_progress", "record_progress", "end_run"]
POINTS = [(f"{op}:{when}", i) for i, op in enumerate(_WRITES)
          for when in ("before-write", "after-write")] + [("mid-write", i) for i in range(4)]


def _child(ledger_path: Path, log_path: Path, point: str, index: int) -> None:
    writes = 0

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(name: str) -> None:
        nonlocal writes
        if name == point and writes == index:
            die()
        if name.endswith(":after-write"):
            writes += 1

    if point == "mid-write":
        real_replace = os.replace

        def replace(src: str, dst: str) -> None:
            if writes == index:
                die()
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    ledger = PrivacyLedger(ledger_path, fault_hook=hook)
    run = ledger.begin_run("alice", q=Q, sigma=SIGMA, clip_norm=1.0, planned_steps=PLANNED,
                           examples=200, accountant="rdp", delta=DELTA, budget_epsilon=50.0)
    for step in range(1, DONE + 1):
        os.write(log, f"{step}\n".encode())  # the step's update exists from here on
        if step in PROGRESS_AT:
            ledger.record_progress(run, step)
    ledger.end_run(run, steps_done=DONE, status="cancelled")
    os._exit(0)


def _prepare(ledger_path: Path) -> None:
    with PrivacyLedger(ledger_path) as ledger:
        run = ledger.begin_run("alice", q=EARLIER.q, sigma=EARLIER.sigma, clip_norm=1.0,
                               planned_steps=80, examples=200, accountant="rdp", delta=DELTA,
                               budget_epsilon=50.0)
        ledger.end_run(run, steps_done=EARLIER.steps, status="completed")


@pytest.mark.parametrize(("point", "index"), POINTS)
def test_kill_at_write_never_under_counts(tmp_path: Path, point: str, index: int) -> None:
    ledger_path, log_path = tmp_path / "ledger.json", tmp_path / "steps.log"
    _prepare(ledger_path)
    ctx = multiprocessing.get_context("fork")  # the child inherits the warm imports
    child = ctx.Process(target=_child, args=(ledger_path, log_path, point, index))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, "the child must die at the write point"

    lines = log_path.read_text().split() if log_path.exists() else []
    steps_done = int(lines[-1]) if lines else 0
    with PrivacyLedger(ledger_path) as ledger:  # loads: the file is not torn
        state = ledger.state("alice")
    recomputed = epsilon(
        runs=[RunCharge(q=r["q"], sigma=r["sigma"], steps=r["steps_charged"]) for r in state.runs],
        delta=state.delta or DELTA, accountant="rdp",
    )
    truth = epsilon(runs=[EARLIER, RunCharge(q=Q, sigma=SIGMA, steps=steps_done)], delta=DELTA,
                    accountant="rdp")
    assert recomputed == pytest.approx(state.epsilon_spent)
    assert recomputed >= truth * (1 - 1e-12)
    if steps_done:
        # Training only started after the write-ahead charge was on disk.
        assert [r["status"] for r in state.runs][1] in ("running", "cancelled")
