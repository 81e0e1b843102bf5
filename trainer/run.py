"""One training run of one adapter, end to end, resumable across restarts.

:meth:`TrainingRun.begin` plans the run and charges the privacy ledger for ALL planned
steps before the first step; :meth:`TrainingRun.execute` trains (Poisson sampling from
the example store, DP-SGD steps in ORT, a checkpoint every ``checkpoint_every`` steps),
closes the ledger record, exports the adapter and passes it through the validation gate
(:mod:`lorad.trainer.validation`), which installs it through ``AdapterService.install`` or
keeps it aside under ``<state_dir>/rejected/<adapter>/<run_id>/``.

Restarts and the ledger
-----------------------
The ledger is the run journal. A run whose ledger record is still ``running`` is an
interrupted run of this adapter, and the next :meth:`begin` resumes it instead of
starting a new one:

- it never calls ``begin_run`` again, so the resumed steps are not charged twice; the
  full planned charge written before the first step covers them;
- it trains with the q, σ and C of the ledger record (not today's config), so what is
  trained is what was charged;
- it continues from the last checkpoint (or from step 0 if none was written); the
  steps done after that checkpoint before the crash left nothing behind (their state
  was never persisted nor released), so the adapter that is finally exported is the
  result of exactly ``planned_steps`` charged steps;
- ``end_run`` lowers the charge only for a cancelled or failed run, to the larger of
  the steps done in this chain and the progress already recorded (which is written only
  after the checkpoint it describes), never below what produced anything released.

A crash between ``begin_run`` and writing ``run.json`` leaves a charged run without
local state: it resumes from step 0 with the ledger's numbers. A crash after
``end_run(completed)`` but before the gate leaves a completed run whose final
checkpoint is still there; :meth:`begin` finishes it (export, gate) without training.

Pause and cancel are ``threading.Event`` s checked between steps (:class:`RunControl`);
``interrupt`` (daemon shutdown) saves a checkpoint and leaves the run resumable.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from lorad.adapters.fsutil import atomic_write_bytes, free_bytes
from lorad.adapters.lora import LoraAdapter
from lorad.adapters.privacy_record import PRIVACY_FILE, PrivacyRecord
from lorad.adapters.service import AdapterService

from .accountant import RunCharge, epsilon
from .batching import collate
from .config import AdapterTrainingConfig, RunPlan, default_delta
from .errors import BadTrainingDataError, TrainingFailedError
from .example_store import ExampleStore
from .ledger import PrivacyLedger, run_charges

if TYPE_CHECKING:
    # The machinery of a run (graphs, backends, the stepper process, the gate) is imported
    # where a run uses it: a daemon that serves and collects examples starts without it.
    from .artifacts import ArtifactConfig, Backend, TrainingArtifacts
    from .dp_step import GaussianNoise, StepResult
    from .federated_start import RoundStart

__all__ = [
    "RunStatus", "RunProgress", "RunResult", "RunControl", "TrainerEnv", "TrainingRun",
    "last_trained_example", "pending_release",
]

_log = logging.getLogger(__name__)

#: ``delivered``: a federated round's update was handed to the federation (nothing installed here).
RunStatus = Literal["accepted", "rejected", "delivered", "cancelled", "failed", "interrupted"]
Phase = Literal["starting", "training", "paused", "validating", "done"]
_RUN_FILE = "run.json"
_CHECKPOINT = "checkpoint"
_EPSILON_EVERY_S = 10.0  # ε so far is recomputed at most this often (PLD takes ~1 s)
# Room a run keeps free beyond its own files: the ledger, run.json and SQLite's journal.
_SPACE_SLACK_BYTES = 16 << 20


@dataclass(frozen=True)
class RunProgress:
    adapter: str
    run_id: int
    phase: Phase
    steps_done: int
    planned_steps: int
    #: ε of the adapter with ``epsilon_steps`` of this run's steps (all earlier runs and
    #: this run's count and gate queries included): the steps done when it was last
    #: computed, which is at most about a second ago.
    epsilon: float
    epsilon_steps: int = 0


@dataclass(frozen=True)
class RunResult:
    adapter: str
    run_id: int
    status: RunStatus
    steps_done: int
    planned_steps: int
    reason: str
    #: The installed version (accepted runs).
    version: int | None = None
    epsilon_spent: float = 0.0


class RunControl:
    """Between-step controls: pause/resume, cancel (end the run), interrupt (shutdown).

    ``time_left_s`` (set by the scheduler for an automatic run in a time window) is how
    long the run may take; ``slowdown`` how much slower than measured steps run now."""

    def __init__(self, *, time_left_s: float | None = None, slowdown: float = 1.0) -> None:
        self.time_left_s = time_left_s
        self.slowdown = slowdown
        self._running = threading.Event()
        self._running.set()
        self._cancel = threading.Event()
        self._interrupt = threading.Event()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._running.set()

    def interrupt(self) -> None:
        self._interrupt.set()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def wait_running(self, timeout: float) -> bool:
        return self._running.wait(timeout)


class _Stepper(Protocol):
    """What a run needs of a backend's stepper (in process) or StepperProcess (isolated)."""

    @property
    def steps(self) -> int: ...

    def step(self, batch: Mapping[str, np.ndarray]) -> StepResult: ...

    def save_checkpoint(self, path: Path) -> None: ...

    def export_adapter(self, *, extra: Mapping[str, str] | None = None) -> LoraAdapter: ...


@dataclass(frozen=True)
class TrainerEnv:
    """What every run shares: the serving side, the data, the ledger, the randomness."""

    service: AdapterService
    store: ExampleStore
    ledger: PrivacyLedger
    #: ``<daemon state dir>/trainer``: runs/, rejected/, artifacts/, adapters/.
    state_dir: Path
    noise: GaussianNoise
    #: Fresh generator for Poisson sampling (secretly seeded in production).
    rng: Callable[[], np.random.Generator]
    #: The training backend new runs use (an interrupted run resumes on its own).
    backend: Backend = "portable"
    device: Literal["cpu", "cuda"] = "cpu"
    intra_op_threads: int = 1
    #: Step in a child process (see trainer/stepper_process.py: ORT's training call holds
    #: the GIL for a whole step, which would stall serving threads in this process).
    isolate: bool = True
    #: Nice value of that child process, and whether it runs in SCHED_IDLE.
    niceness: int = 10
    sched_idle: bool = False
    #: Cumulative joules the daemon attributes to training (its power sampler); a run's
    #: energy is the difference over the run. None: no power source, no figure.
    energy_joules: Callable[[], float] | None = None
    #: The adapter's guarantee as its privacy state reports it (per example, or per user
    #: with ``user_epsilon_spent``): what a trained version's privacy record states.
    guarantee: Callable[[str], Mapping[str, Any]] | None = None


def last_trained_example(state_dir: Path, adapter: str) -> int | None:
    """Highest example id the adapter's last completed run could sample (None: never, or
    its record is damaged: then every example counts as new, with a warning)."""
    path = state_dir / "adapters" / f"{adapter}.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _warn_damaged(path, str(e))
        return None
    value = doc.get("last_example_id") if isinstance(doc, dict) else "?"
    if value is not None and not isinstance(value, int):
        _warn_damaged(path, "expected an object with an integer or null last_example_id")
        return None
    return value


_warned: set[tuple[Path, int, int]] = set()


def _warn_damaged(path: Path, why: str) -> None:
    """Warn once per damaged content of a trainer state file (read at every scheduler check)."""
    try:
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
    except OSError:
        key = (path, 0, -1)
    if key not in _warned:
        _warned.add(key)
        _log.warning("%s is damaged (%s); treated as absent", path, why)


def _gate_calls(plan: RunPlan, config: AdapterTrainingConfig) -> int:
    """How many batches the gate scores the held-out split in: from the run's public count
    (its held-out share, with half again for the split's and the count's spread), so that
    the calls it makes (public inference counters) do not follow the exact count."""
    from .validation import GATE_BATCH

    expected = plan.examples * config.holdout_fraction / (1.0 - config.holdout_fraction)
    return max(1, math.ceil(1.5 * expected / GATE_BATCH))


def _measured_step(state_dir: Path, adapter: str) -> float | None:
    """Seconds per step and expected batch row, measured in the adapter's last run (private:
    on the device only, like the examples it ran on)."""
    try:
        value = json.loads((state_dir / "step-times.json").read_text()).get(adapter)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _save_measured_step(state_dir: Path, adapter: str, seconds: float) -> None:
    path = state_dir / "step-times.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc = {**(doc if isinstance(doc, dict) else {}), adapter: seconds}
    atomic_write_bytes(path, (json.dumps(doc) + "\n").encode(), mode=0o600)


def pending_release(state_dir: Path, ledger: PrivacyLedger, adapter: str) -> bool:
    """Whether the adapter has a completed, paid-for run that was never validated (the
    daemon stopped in the ``validating`` phase): :meth:`TrainingRun.begin` finishes it."""
    directory = state_dir / "runs" / adapter
    try:
        doc = json.loads((directory / _RUN_FILE).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        _warn_damaged(directory / _RUN_FILE, str(e))
        return False
    run_id = doc.get("run_id") if isinstance(doc, dict) else None
    return (directory / _CHECKPOINT).is_file() and any(
        r["run_id"] == run_id and r["status"] == "completed" for r in ledger.state(adapter).runs)


class TrainingRun:
    """Plan, charge, train, close, validate, install — for one adapter."""

    def __init__(
        self, env: TrainerEnv, adapter: str, config: AdapterTrainingConfig, *,
        control: RunControl | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        on_step: Callable[[], None] | None = None,
        federated: RoundStart | None = None,
    ) -> None:
        self.env = env
        #: A federated round (trainer/federated.py): starts from the federation's B, trains
        #: on every local example, and hands its B out as :attr:`update` instead of validating
        #: and installing it. Never resumed after a restart (the federation's round is gone).
        self.federated = federated
        self.update: LoraAdapter | None = None
        self.adapter = adapter
        self.config = config
        self.control = control or RunControl()
        self._on_progress = on_progress
        self._on_step = on_step
        self._dir = env.state_dir / "runs" / adapter
        self.run_id: int | None = None
        self.plan: RunPlan | None = None
        self.resumed = False
        self._finish_only = False
        self._saved: dict[str, Any] = {}
        self._recorded = 0  # progress recorded in the ledger for this run
        self._energy_start: float | None = None
        self._stepper_obj: object = None
        self._epsilon = 0.0
        self._epsilon_at = -math.inf
        self._epsilon_steps = -1
        self._epsilon_cost = 0.0

    # -- begin -----------------------------------------------------------------------------

    def begin(self) -> int:
        """Resume the adapter's interrupted run, or plan a new one and charge it first.

        Raises PrivacyBudgetExceededError (nothing charged) or ValueError (bad plan).
        """
        from .model_setup import preflight

        ledger_runs = self.env.ledger.state(self.adapter).runs
        saved = self._read_run_file()
        running = [r for r in ledger_runs if r["status"] == "running"]
        if running and self.federated is not None:
            # A round interrupted by a restart cannot resume (its federation round is over):
            # it ends cancelled, charged for the progress recorded (nothing of it was released).
            for record in running:
                _log.warning("adapter %r: federated round run %d was interrupted; closed at step %d",
                             self.adapter, record["run_id"], record["steps_done"])
                self.env.ledger.end_run(int(record["run_id"]), steps_done=int(record["steps_done"]),
                                        status="cancelled")
            ledger_runs = self.env.ledger.state(self.adapter).runs
            running = []
        if running:
            record = running[-1]
            self.run_id = int(record["run_id"])
            self._recorded = int(record["steps_done"])
            self.resumed = True
            _log.info("adapter %r: resuming interrupted training run %d", self.adapter, self.run_id)
            if saved.get("run_id") == self.run_id:
                self._saved = saved
                self.plan = self._plan_from_ledger(record)
            else:
                # Charged, but crashed before its local state was written: start it at step 0
                # (any other run's leftovers here must not be resumed by mistake).
                shutil.rmtree(self._dir, ignore_errors=True)
                self.plan = self._plan_from_ledger(record)
                self._write_run_file(self.plan, last_example=max(self._split()[0], default=None))
            return self.run_id
        done = next((r for r in ledger_runs if saved and r["run_id"] == saved.get("run_id")), None)
        if done is not None and done["status"] == "completed" and (self._dir / _CHECKPOINT).is_file():
            self.run_id, self._saved, self._finish_only = int(done["run_id"]), saved, True
            self.plan = self._plan_from_ledger(done)
            return self.run_id
        shutil.rmtree(self._dir, ignore_errors=True)  # local state of an ended run
        self._check_ledger_knows_trained_versions(ledger_runs)
        # Everything that needs no private data is checked before anything is charged:
        # the artifacts build, the loss output fits, the gate can score (model_setup.py).
        artifacts = preflight(self.env.service, self.config, cache_dir=self.env.state_dir / "artifacts",
                              backend=self._backend())
        if self.federated is not None:
            from .federated_start import check_start

            check_start(artifacts, self.federated)
        self._check_space(artifacts.noise_size)
        train, _ = self._split()
        state = self.env.ledger.state(self.adapter)
        # The mechanism is planned from a private estimate of n (a Gaussian count query,
        # charged with the run), never from n itself: q, steps, σ, δ and the update's
        # scale are public, so planning from n would publish n and let one example change
        # all of them. Whether there are enough examples is decided on it too: a refusal
        # on the exact counts would publish them at the threshold.
        cfg = self.config
        estimate = len(train) + float(self.env.noise.gaussian64(1, cfg.count_noise)[0])
        try:
            cfg.check_estimate(estimate, holdout=self.federated is None)
        except ValueError:
            self._charge_count(estimate, state.delta or default_delta(max(estimate, 1.0)))
            raise
        plan = self.config.plan(estimate, prior=[c for r in state.runs for c in run_charges(r)],
                                ledger_delta=state.delta, adapter=self.adapter, gate=self.federated is None)
        self._check_time(plan, estimate, state.delta)
        self.run_id = self.env.ledger.begin_run(
            self.adapter, q=plan.q, sigma=plan.sigma, clip_norm=plan.clip_norm, planned_steps=plan.steps,
            examples=plan.examples, accountant=plan.accountant, delta=plan.delta,
            budget_epsilon=plan.budget_epsilon, mechanisms=plan.mechanisms,
        )
        self.plan = plan
        self._write_run_file(plan, last_example=max(train, default=None))
        return self.run_id

    def _charge_count(self, estimate: float, delta: float) -> None:
        """Charge the private count of a run refused on it (a ``query`` record): the
        refusal was decided on that count, so the count was released."""
        cfg = self.config
        self.env.ledger.charge_queries(
            self.adapter, mechanisms=[("example_count", "sigma", cfg.count_noise)], examples=max(round(estimate), 0),
            accountant=cfg.accountant, delta=cfg.delta or delta, budget_epsilon=cfg.target_epsilon,
            clip_norm=cfg.clip_norm)

    def _check_space(self, parameters: int) -> None:
        """Refuse, before anything is charged, a run the disk cannot hold: its checkpoints
        (parameters and two AdamW moments, written beside the previous one) and its result
        (the adapter in the registry and, if rejected, aside), with room to spare. A run
        that ran out of space at its checkpoint used to fail after its ε was charged."""
        need = 8 * 4 * parameters + _SPACE_SLACK_BYTES
        free = free_bytes(self.env.state_dir)
        if free < need:
            raise TrainingFailedError(
                f"not started: the state directory's filesystem has {free} bytes free and a run of this adapter needs "
                f"about {need} for its checkpoints and result; free space and start it again. Nothing was charged"
            ) from OSError(errno.ENOSPC, "no space left for a training run")

    def _check_time(self, plan: RunPlan, estimate: float, ledger_delta: float | None) -> None:
        """Don't start (and charge) an automatic run that would not finish in its time
        window: its duration is estimated from the step time measured in the adapter's
        last run (per expected batch row) and the device's load now. The plan comes from
        the private count, so a refusal charges that count query, as a too-few refusal does."""
        left = self.control.time_left_s
        measured = _measured_step(self.env.state_dir, self.adapter)
        if left is None or measured is None:
            return
        seconds = plan.steps * measured * max(plan.expected_batch_size, 1.0) * self.control.slowdown
        if seconds <= left:
            return
        self._charge_count(estimate, ledger_delta or plan.delta)
        raise ValueError(
            f"the run would take about {seconds / 60:.0f} min ({plan.steps} steps at the step time measured in the last "
            f"run, ×{self.control.slowdown:.1f} for the load now) and {left / 60:.0f} min of the time window are left; "
            "it starts in a later window. Its private count was charged; nothing else was")

    def _check_ledger_knows_trained_versions(self, ledger_runs: list[dict[str, Any]]) -> None:
        """Refuse to train on a ledger that lost runs whose results are still stored.

        A deleted or replaced ledger would hand the data its whole budget again; every
        version this trainer installed records its run id, so such a ledger shows.
        """
        registry = self.env.service.registry
        # A damaged adapter (AdapterDamagedError) is repaired before it is trained: the gate
        # compares with its current version. Refused here, before anything is charged.
        registry.current_version(self.adapter)
        known = {int(r["run_id"]) for r in ledger_runs}
        for version in registry.versions(self.adapter):
            meta = registry.get(self.adapter, version).meta
            run_id = meta.get("run_id")
            if meta.get("source") == "trainer" and isinstance(run_id, int) and run_id not in known:
                raise BadTrainingDataError(
                    f"adapter {self.adapter!r}: version {version} was trained here in run {run_id}, which the "
                    f"privacy ledger does not record; the ledger was reset or replaced, so the privacy spent "
                    f"on this adapter's data is unknown. Restore the ledger, or delete the adapter and its "
                    f"examples to start over"
                )

    def _plan_from_ledger(self, record: dict[str, Any]) -> RunPlan:
        n = int(record["examples"])
        ebs = self._saved.get("expected_batch_size")
        return RunPlan(
            q=float(record["q"]), expected_batch_size=float(ebs) if ebs else float(record["q"]) * max(n, 1),
            steps=int(record["planned_steps"]), sigma=float(record["sigma"]),
            clip_norm=float(record["clip_norm"]), delta=float(record["delta"]),
            accountant=record["accountant"], budget_epsilon=float(record["budget_epsilon"]), examples=n,
            mechanisms=tuple((str(m["what"]), float(m["sigma"])) for m in record.get("mechanisms", [])),
        )

    def _split(self) -> tuple[list[int], list[int]]:
        c = self.config
        train, holdout = self.env.store.split(self.adapter, c.holdout_fraction, c.split_seed)
        # A federated round's update is not validated here: every example trains.
        return (sorted(train + holdout), []) if self.federated is not None else (train, holdout)

    def _artifact_config(self) -> ArtifactConfig:
        from .artifacts import ArtifactConfig
        from .model_setup import artifact_config_for

        saved = self._saved.get("artifact_config")
        if isinstance(saved, dict):
            return ArtifactConfig(**{**saved, "targets": tuple(saved["targets"])})
        return artifact_config_for(self.env.service, self.config)

    def _backend(self) -> Backend:
        """The run's backend: the one it started on (its checkpoints are that backend's)."""
        saved = self._saved.get("backend")
        return saved if saved in ("portable", "ort-training") else self.env.backend

    def _check_rank(self, rank: int) -> None:
        slots = self.env.service.engine.rank
        if rank > slots:
            raise ValueError(f"rank {rank} of adapter {self.adapter!r} exceeds the serving slot rank {slots}; "
                             "lower the adapter's rank or raise model.rank")

    def _read_run_file(self) -> dict[str, Any]:
        """The run's local state; {} if there is none.

        A damaged file (not JSON, not an object with an integer run_id) counts as none, with
        a warning: begin() then restarts an interrupted run at step 0 under the charge the
        ledger already holds, or plans a new run (a completed run not yet released stays
        charged and is not released). The ledger alone decides what is charged, so nothing
        is ever charged less; one damaged file stops neither the trainer nor other adapters.
        A read the disk refuses is still an error (nothing is deleted on it).
        """
        path = self._dir / _RUN_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, IsADirectoryError) as e:
            doc, why = None, str(e)
        except OSError as e:
            raise BadTrainingDataError(
                f"adapter {self.adapter!r}: cannot read the run state {path}: {e}; nothing was deleted. "
                f"Repair or remove {self._dir} (removing it restarts an interrupted run at step 0)") from e
        else:
            why = "expected an object with an integer run_id"
        if not (isinstance(doc, dict) and isinstance(doc.get("run_id"), int)):
            _log.warning("adapter %r: the run state %s is damaged (%s); treated as absent: an interrupted run "
                         "restarts at step 0 under the charge the ledger holds, a trained run not yet released "
                         "is not released", self.adapter, path, why)
            return {}
        return doc

    def _write_run_file(self, plan: RunPlan, *, last_example: int | None) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "run_id": self.run_id, "expected_batch_size": plan.expected_batch_size,
            "learning_rate": self._saved.get("learning_rate", self.config.learning_rate),
            "artifact_config": asdict(self._artifact_config()), "last_example_id": last_example,
            "backend": self._backend(),
        }
        self._saved = doc
        atomic_write_bytes(self._dir / _RUN_FILE, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)

    # -- execute ---------------------------------------------------------------------------

    def execute(self) -> RunResult:
        """Train (or finish) the begun run; returns how it ended. Never leaves the ledger
        record of a cancelled or failed run open."""
        if self.run_id is None or self.plan is None:
            raise RuntimeError("call begin() before execute()")
        run_id, plan = self.run_id, self.plan
        try:
            return self._execute(run_id, plan)
        finally:
            close = getattr(self._stepper_obj, "close", None)
            if close is not None:
                close()

    def _execute(self, run_id: int, plan: RunPlan) -> RunResult:
        stepper: _Stepper | None = None
        steps = 0
        self._energy_start = self.env.energy_joules() if self.env.energy_joules is not None else None
        try:
            artifacts = self._artifacts()
            stepper = self._stepper_obj = self._stepper(artifacts, plan)
            steps = stepper.steps
            if not self._finish_only:
                outcome = self._train(stepper, artifacts, plan)
                steps = stepper.steps
                if outcome != "completed":
                    return self._stop(outcome, steps)
                stepper.save_checkpoint(self._dir / _CHECKPOINT)
                self.env.ledger.end_run(run_id, steps_done=plan.steps, status="completed",
                                        energy_joules=self._energy_used())
        except Exception as e:
            _log.error("adapter %r: training run %d failed: %s", self.adapter, run_id, e)
            return self._stop("failed", stepper.steps if stepper is not None else steps, reason=str(e))
        # Everything below is released only after the ledger holds the final charge.
        try:
            return self._release(stepper, plan)
        except Exception as e:
            # The charge stands (completed); the trained version is lost, not retried forever.
            _log.error("adapter %r: run %d trained but could not be validated or installed: %s",
                       self.adapter, run_id, e)
            shutil.rmtree(self._dir, ignore_errors=True)
            return RunResult(self.adapter, run_id, "failed", plan.steps, plan.steps,
                             f"validation or install failed: {e}", None, self._spent())

    def _artifacts(self) -> TrainingArtifacts:
        from .artifacts import build_artifacts

        engine = self.env.service.engine
        artifacts = build_artifacts(engine.base_model, self._artifact_config(), cache_dir=self.env.state_dir / "artifacts",
                                    backend=self._backend(), model_digest=engine.model_digest, isolate=True)
        if artifacts.base_fingerprint != engine.fingerprint:
            raise TrainingFailedError(
                f"training artifacts are for base model {artifacts.base_fingerprint}, serving is "
                f"{engine.fingerprint}; the base model changed during the run")
        self._check_rank(artifacts.config.rank)
        return artifacts

    def _stepper(self, artifacts: TrainingArtifacts, plan: RunPlan) -> _Stepper:
        from .backends import open_stepper
        from .dp_step import DPSettings
        from .model_setup import part_rows
        from .stepper_process import StepperProcess

        checkpoint = self._dir / _CHECKPOINT
        if self.federated is not None and not checkpoint.is_file():
            from .federated_start import write_start_checkpoint

            write_start_checkpoint(artifacts, self.federated, checkpoint)
        resume = checkpoint if checkpoint.is_file() else None
        lr = float(self._saved.get("learning_rate", self.config.learning_rate))
        dp = DPSettings(noise_multiplier=plan.sigma, clip_norm=plan.clip_norm,
                        expected_batch_size=plan.expected_batch_size)
        stepper: _Stepper
        if self.env.isolate:
            secure = getattr(self.env.noise, "secure", False)
            stepper = StepperProcess(
                artifacts, learning_rate=lr, dp=dp, noise_seed=None if secure else int(getattr(self.env.noise, "seed", 0)),
                device=self.env.device, intra_op_threads=self.env.intra_op_threads, resume_from=resume,
                niceness=self.env.niceness, idle_class=self.env.sched_idle,
                max_part_rows=part_rows(self.env.service, self.config),
            )
        else:
            # Seeded (test) noise: a fresh stream from the seed, exactly as the child process
            # makes it, so both paths train alike whatever else drew from env.noise.
            from .noise import SeededNoise

            secure = getattr(self.env.noise, "secure", False)
            noise = self.env.noise if secure else SeededNoise(int(getattr(self.env.noise, "seed", 0)))
            stepper = open_stepper(artifacts, learning_rate=lr, dp=dp, noise=noise, device=self.env.device,
                                   intra_op_threads=self.env.intra_op_threads, resume_from=resume,
                                   max_part_rows=part_rows(self.env.service, self.config))
        if stepper.steps > plan.steps:
            raise TrainingFailedError(f"checkpoint {checkpoint} is at step {stepper.steps}, beyond the "
                                      f"run's {plan.steps} planned steps")
        return stepper

    def _train(self, stepper: _Stepper, artifacts: TrainingArtifacts, plan: RunPlan) -> RunStatus | Literal["completed"]:
        from .lm_examples import collate_texts
        from .model_setup import pad_length, training_layouts

        assert self.run_id is not None
        layouts = training_layouts(artifacts)
        train_ids, _ = self._split()
        rng = self.env.rng()
        skipped_total = 0
        stepping, stepped = 0.0, 0
        self._report(stepper.steps, "training", force_epsilon=True)
        while stepper.steps < plan.steps:
            if self.control.paused:
                self._report(stepper.steps, "paused")
                while not self.control.wait_running(0.5):
                    pass
                self._report(stepper.steps, "training")
            if self.control.cancelled:
                return "cancelled"
            if self.control.interrupted:
                self._checkpoint(stepper)
                return "interrupted"
            ids = self.env.store.sample_poisson(self.adapter, plan.q, rng, among=train_ids)
            sampled = self.env.store.load(ids, skip_missing=True)
            if artifacts.config.loss == "causal_lm":
                batch, skipped = collate_texts(sampled, window=self.config.window_tokens,
                                               label_input=artifacts.label_input)
            else:
                batch, skipped = collate(sampled, inputs_layout=layouts[:-1], label_layout=layouts[-1],
                                         pad_to=pad_length(self.env.service, self.config))
            skipped_total += skipped
            began = time.monotonic()
            stepper.step(batch)
            stepping += time.monotonic() - began
            stepped += 1
            if self._on_step is not None:
                self._on_step()
            if stepper.steps % self.config.checkpoint_every == 0 and stepper.steps < plan.steps:
                self._checkpoint(stepper)
            self._report(stepper.steps, "training")
        if skipped_total:
            _log.warning("adapter %r: %d sampled examples did not fit the model and were left out",
                         self.adapter, skipped_total)
        if stepped:
            _save_measured_step(self.env.state_dir, self.adapter, stepping / stepped / max(plan.expected_batch_size, 1.0))
        return "completed"

    def _checkpoint(self, stepper: _Stepper) -> None:
        assert self.run_id is not None
        stepper.save_checkpoint(self._dir / _CHECKPOINT)
        # Progress is recorded only after the checkpoint it describes is on disk.
        if stepper.steps > self._recorded:
            self.env.ledger.record_progress(self.run_id, stepper.steps)
            self._recorded = stepper.steps

    def _energy_used(self) -> float | None:
        """Joules attributed to training since this process started executing the run
        (a run resumed after a restart counts from the resume)."""
        start = self._energy_start
        if start is None or self.env.energy_joules is None:
            return None
        return max(0.0, self.env.energy_joules() - start)

    def _stop(self, status: RunStatus, steps: int, *, reason: str = "") -> RunResult:
        assert self.run_id is not None and self.plan is not None
        if status == "interrupted":
            return RunResult(self.adapter, self.run_id, status, steps, self.plan.steps,
                             reason or "interrupted; resumes at the next start", None, self._spent())
        ledger_status: Literal["cancelled", "failed"] = "cancelled" if status == "cancelled" else "failed"
        try:
            if self._ledger_record().get("status") == "running":
                self.env.ledger.end_run(self.run_id, steps_done=max(steps, self._recorded),
                                        status=ledger_status, energy_joules=self._energy_used())
        except Exception as e:  # the full planned charge stays: an over-count, never an under-count
            _log.error("adapter %r: could not close ledger run %d: %s", self.adapter, self.run_id, e)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._report(steps, "done")
        return RunResult(self.adapter, self.run_id, status, steps, self.plan.steps,
                         reason or status, None, self._spent())

    def _ledger_record(self) -> dict[str, Any]:
        return next((r for r in self.env.ledger.state(self.adapter).runs if r["run_id"] == self.run_id), {})

    def _release(self, stepper: _Stepper, plan: RunPlan) -> RunResult:
        from .model_setup import loss_output, pad_length
        from .validation import keep_rejected, validate_candidate

        assert self.run_id is not None
        run_id = self.run_id
        self._report(plan.steps, "validating", force_epsilon=True)
        spent = self._spent()
        candidate = stepper.export_adapter(extra={"lorad_run_id": str(run_id)})
        if self.federated is not None:
            self.update = candidate
            shutil.rmtree(self._dir, ignore_errors=True)
            self._report(plan.steps, "done")
            _log.info("adapter %r: federated round %d trained as run %d (ε spent %.4g); update handed out",
                      self.adapter, self.federated.round, run_id, spent)
            return RunResult(self.adapter, run_id, "delivered", plan.steps, plan.steps,
                             f"federated round {self.federated.round}: update handed to the federation", None, spent)
        # The step session's memory goes back before the gate scores (SmolLM2: 0.8 GB).
        close = getattr(stepper, "close", None)
        if close is not None:
            close()
        c = self.config
        _, holdout_ids = self._split()
        holdout = self.env.store.load(holdout_ids, skip_missing=True)
        gate_sigma = dict(plan.mechanisms).get("validation_gate")
        gate = validate_candidate(
            self.env.service, self.adapter, candidate, holdout, metric=c.validation_metric,
            # The output the run trained on (model_setup.loss_output), which the gate scores too.
            loss=self._artifact_config().loss,
            output=self._artifact_config().output or loss_output(self.env.service, c).name, margin=c.validation_margin,
            noise=self.env.noise if gate_sigma else None, noise_multiplier=gate_sigma or 0.0,
            score_clip=c.gate_clip, pad_to=pad_length(self.env.service, c), calls=_gate_calls(plan, c),
            window=c.window_tokens,
        )
        self.env.service.engine.release_session()  # a decoder's, opened for the gate
        if self.control.cancelled:
            # Cancelled while validating: the charge stands (the run completed), nothing is served.
            where = keep_rejected(self.env.state_dir / "rejected" / self.adapter / str(run_id), candidate, gate,
                                  run_id=run_id)
            self._mark_trained()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._report(plan.steps, "done")
            return RunResult(self.adapter, run_id, "cancelled", plan.steps, plan.steps,
                             f"cancelled before release; the trained version was kept aside in {where}", None, spent)
        version = None
        if gate.accepted:
            record = self._privacy_record(plan, spent, candidate.base_fingerprint)
            meta = {"source": "trainer", "run_id": run_id, "epsilon_spent": spent, "delta": self._delta(),
                    "accountant": plan.accountant, "validated_against": gate.baseline, "privacy": record.to_dict()}
            files = {PRIVACY_FILE: (json.dumps(record.to_dict(), indent=1) + "\n").encode()}
            version = self.env.service.install(self.adapter, candidate, meta=meta, files=files).version
            # The extra fields become journald fields (LORAD_ADAPTER=...) under systemd.
            _log.info("adapter %r: run %d installed as version %d (%s; ε spent %.4g)", self.adapter, run_id, version,
                      gate.reason, spent, extra={"LORAD_ADAPTER": self.adapter, "LORAD_VERSION": version,
                                                 "LORAD_EPSILON": spent, "LORAD_RUN_ID": run_id})
        else:
            where = keep_rejected(self.env.state_dir / "rejected" / self.adapter / str(run_id), candidate, gate,
                                  run_id=run_id, module_of=self.env.service.engine.module_paths.module_of)
            _log.warning("adapter %r: run %d rejected by the validation gate: %s; kept aside in %s",
                         self.adapter, run_id, gate.reason, where)
        self._mark_trained()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._report(plan.steps, "done")
        return RunResult(self.adapter, run_id, "accepted" if gate.accepted else "rejected", plan.steps,
                         plan.steps, gate.reason, version, spent)

    def _privacy_record(self, plan: RunPlan, spent: float, base_fingerprint: str) -> PrivacyRecord:
        """What the version was trained on (ota/privacy.py's record, as a fleet update carries
        it): the adapter's ε so far per its privacy unit, this run's mechanism, the private
        count estimate, what one example is and the base model."""
        guarantee = self.env.guarantee(self.adapter) if self.env.guarantee is not None else {}
        per_user = guarantee.get("guarantee") == "per user"
        example = ("one submitted text: all its token windows, clipped as one"
                   if self._artifact_config().loss == "causal_lm" else "one labelled example")
        return PrivacyRecord(
            epsilon=float(guarantee["user_epsilon_spent"]) if per_user else spent, delta=self._delta(),
            accountant=plan.accountant, sample_rate=plan.q, noise_multiplier=plan.sigma, steps=plan.steps,
            unit="user" if per_user else "example", examples=float(plan.examples), example=example,
            base_fingerprint=base_fingerprint)

    def _mark_trained(self) -> None:
        last = self._saved.get("last_example_id")
        doc = {"last_example_id": last if isinstance(last, int) else None, "last_run_id": self.run_id,
               "updated_at": time.time()}
        path = self.env.state_dir / "adapters" / f"{self.adapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, (json.dumps(doc) + "\n").encode(), mode=0o600)

    # -- progress --------------------------------------------------------------------------

    def _spent(self) -> float:
        return float(self.env.ledger.state(self.adapter).epsilon_spent)

    def _report(self, steps: int, phase: Phase, *, force_epsilon: bool = False) -> None:
        if self._on_progress is None or self.run_id is None or self.plan is None:
            return
        now = time.monotonic()
        # Recomputing ε takes from milliseconds (RDP) to a second (PLD), on the training
        # thread: refresh when the last value is older than ten times what it took (at
        # least 0.5 s, at most 10 s), and say which step it is for.
        stale = now - self._epsilon_at >= min(_EPSILON_EVERY_S, max(0.5, 10 * self._epsilon_cost))
        if force_epsilon or steps == self.plan.steps or (stale and steps != self._epsilon_steps):
            self._epsilon = self._epsilon_so_far(steps)
            self._epsilon_steps, self._epsilon_at = steps, time.monotonic()
            self._epsilon_cost = self._epsilon_at - now
        self._on_progress(RunProgress(self.adapter, self.run_id, phase, steps, self.plan.steps, self._epsilon,
                                      max(self._epsilon_steps, 0)))

    def _epsilon_so_far(self, steps: int) -> float:
        assert self.plan is not None
        state = self.env.ledger.state(self.adapter)
        others = [c for r in state.runs if r["run_id"] != self.run_id for c in run_charges(r)]
        # This run's count and gate queries are charged (and the count used) from its start.
        mine = [RunCharge(q=1.0, sigma=s, steps=1) for _, s in self.plan.mechanisms]
        mine += [RunCharge(q=self.plan.q, sigma=self.plan.sigma, steps=steps)] if steps else []
        return epsilon(runs=[*others, *mine], delta=state.delta or self.plan.delta, accountant=self.plan.accountant)

    def _delta(self) -> float:
        """The δ the ledger composes this adapter's ε at (never above any run's δ)."""
        assert self.plan is not None
        return self.env.ledger.state(self.adapter).delta or self.plan.delta
