"""A training backend's stepper in its own process, so training cannot stall serving.

Measured (ORT 1.19, reference encoder, batch 16): ``Module.__call__`` of ORT's training
API holds the Python GIL for the whole step (~50 ms with one intra-op thread), so a
training thread in the daemon blocks every serving thread for that long; niceness does
not help against a lock. Inference (``InferenceSession.run``) releases the GIL; training
does not. So the stepper runs in a child process with its own interpreter, reniced as a
whole (nice applies to the child's threads, which inherit it), and this proxy forwards
the few calls a run makes over a pipe: batches go in (a few hundred KB per step), step
results, checkpoints and the exported adapter come back.

The child is started with ``spawn`` (never ``fork``: the daemon has threads and ORT
sessions a forked child must not inherit). Its noise source is made in the child —
``SecureNoise`` with its own kernel-random key, or, in test mode only, ``SeededNoise``
with the same seed — so no generator state crosses the process boundary.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lorad.adapters.lora import LoraAdapter, LoraWeights

from .artifacts import TrainingArtifacts
from .dp_step import DPSettings, StepResult
from .errors import BadTrainingDataError, TrainingFailedError

__all__ = ["StepperProcess"]


class StepperProcess:
    """The subset of a stepper (trainer/backends.py) a training run uses, out of process."""

    def __init__(
        self,
        artifacts: TrainingArtifacts,
        *,
        learning_rate: float,
        dp: DPSettings,
        noise_seed: int | None,
        device: Literal["cpu", "cuda"] = "cpu",
        intra_op_threads: int = 1,
        resume_from: Path | None = None,
        niceness: int = 10,
        idle_class: bool = False,
        max_part_rows: int | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        kwargs = dict(learning_rate=learning_rate, dp=dp, device=device, intra_op_threads=intra_op_threads,
                      resume_from=resume_from, max_part_rows=max_part_rows)
        self._process = context.Process(
            target=_child_main, args=(child, artifacts, kwargs, noise_seed, niceness, idle_class),
            name="lorad-trainer-step", daemon=True,
        )
        self._process.start()
        child.close()
        # No deadline: on a busy device the niced child may take minutes to load its
        # session, and a run that is charged must not fail for being slow (it used to
        # fail after 120 s, charged). A child that dies is noticed within a second (_call).
        self._steps = int(self._call("steps"))

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, batch: Mapping[str, np.ndarray]) -> StepResult:
        result: StepResult = self._call("step", dict(batch))
        self._steps = result.step
        return result

    def save_checkpoint(self, path: Path) -> None:
        self._call("save_checkpoint", Path(path))

    def export_adapter(self, *, extra: Mapping[str, str] | None = None) -> LoraAdapter:
        rank, alpha, weights, fingerprint, rslora, extra_out = self._call("export_adapter", dict(extra or {}))
        return LoraAdapter(rank=rank, alpha=alpha, base_fingerprint=fingerprint, use_rslora=rslora, extra=extra_out,
                           weights={k: LoraWeights(a, b) for k, (a, b) in weights.items()})

    def close(self) -> None:
        """Stop the child; safe to call twice."""
        if self._process.is_alive():
            try:
                self._conn.send(("exit", None))
            except OSError:
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._conn.close()

    def __enter__(self) -> StepperProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, arg: Any = None) -> Any:
        try:
            self._conn.send((method, arg))
            while not self._conn.poll(1.0):
                if not self._process.is_alive():
                    raise EOFError
            kind, value = self._conn.recv()
        except (EOFError, OSError) as e:
            code = self._process.exitcode
            raise TrainingFailedError(f"the training process died (exit code {code}) during {method}") from e
        if kind == "ok":
            return value
        cls = BadTrainingDataError if kind == "BadTrainingDataError" else TrainingFailedError
        raise cls(value)


def _child_main(conn: multiprocessing.connection.Connection, artifacts: TrainingArtifacts, kwargs: dict[str, Any],
                noise_seed: int | None, niceness: int, idle_class: bool) -> None:
    # Whole child below serving's priority; threads ORT starts later inherit it.
    os.setpriority(os.PRIO_PROCESS, 0, max(niceness, os.getpriority(os.PRIO_PROCESS, 0)))
    if idle_class:
        # SCHED_IDLE: runs only on CPU time no normal thread wants; serving wakeups preempt it.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    from .backends import open_stepper
    from .noise import NoiseSource, SecureNoise, SeededNoise

    try:
        noise: NoiseSource = SecureNoise() if noise_seed is None else SeededNoise(noise_seed)
        stepper = open_stepper(artifacts, noise=noise, **kwargs)
    except Exception as e:
        _answer_error(conn, e)
        return
    while True:
        try:
            method, arg = conn.recv()
        except EOFError:
            return
        if method == "exit":
            return
        try:
            if method == "steps":
                value: Any = stepper.steps
            elif method == "step":
                value = stepper.step(arg)
            elif method == "save_checkpoint":
                stepper.save_checkpoint(arg)
                value = None
            elif method == "export_adapter":
                a = stepper.export_adapter(extra=arg)
                value = (a.rank, a.alpha, {k: (w.A, w.B) for k, w in a.weights.items()}, a.base_fingerprint,
                         a.use_rslora, dict(a.extra))
            else:
                raise ValueError(f"unknown stepper call {method!r}")
            conn.send(("ok", value))
        except Exception as e:
            _answer_error(conn, e)


def _answer_error(conn: multiprocessing.connection.Connection, e: Exception) -> None:
    message = f"{e}" if isinstance(e, (BadTrainingDataError, TrainingFailedError)) else (
        f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
    conn.send((type(e).__name__, message))
