"""The seam between a training run and the two training backends.

- ``portable``: lorad's own step graph in a plain ``onnxruntime.InferenceSession``
  (:mod:`lorad.trainer.portable_graph`, :mod:`lorad.trainer.portable`); runs on every onnxruntime
  build and execution provider.
- ``ort-training``: ONNX Runtime's on-device training API (:mod:`lorad.trainer.artifacts`,
  :mod:`lorad.trainer.dp_step`); needs an onnxruntime built with the training APIs
  (onnxruntime-training-cpu 1.19.2 on x86_64, or the Yocto training build).

``auto`` picks the backend the installed runtime supports, preferring portable.
Measured with ``benchmarks/training.py`` (reference encoder, rank 8) on 2 cores shared with
7 other jobs, both backends in one process on onnxruntime-training 1.19.2: the portable
plain step was faster (67 vs 182 ms at batch 16, 873 vs 1009 ms at 64; 1241 vs 1356 ms in
another run); its DP step was faster in one run (1556 vs 1669 ms at 64) and slower in
another (1.05x at 64, 2.1x at 16), within that machine's noise. Portable is preferred
because it is not slower beyond that noise, it runs on the current onnxruntime (two years
of kernels newer) and on every device, and the daemon then trains the same way
everywhere; ort-training stays selectable where installed. Re-measure on a quiet machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from lorad.adapters.lora import LoraAdapter

from ._ort_training import TrainingUnavailableError
from ._ort_training import load as _load_ort_training
from .artifacts import BACKENDS, Backend, TrainingArtifacts
from .dp_step import DPSettings, GaussianNoise, StepResult

__all__ = ["BackendChoice", "BACKEND_CHOICES", "AUTO_PREFERENCE", "Stepper", "available_backends",
           "resolve_backend", "open_stepper"]

BackendChoice = Literal["portable", "ort-training", "auto"]
BACKEND_CHOICES: tuple[BackendChoice, ...] = ("portable", "ort-training", "auto")
#: Fastest first, as measured (see the module docstring).
AUTO_PREFERENCE: tuple[Backend, ...] = ("portable", "ort-training")


class Stepper(Protocol):
    """What a training run needs of a backend's stepper."""

    @property
    def steps(self) -> int: ...

    def step(self, batch: Mapping[str, np.ndarray]) -> StepResult: ...

    def save_checkpoint(self, path: Path) -> None: ...

    def parameters(self) -> dict[str, np.ndarray]: ...

    def export_adapter(self, *, extra: Mapping[str, str] | None = None) -> LoraAdapter: ...

    def eval_loss_sum(self, batch: Mapping[str, np.ndarray]) -> float: ...


def available_backends() -> dict[Backend, str | None]:
    """Each backend and why it cannot run here (None: it can)."""
    try:
        _load_ort_training()
        ort_reason = None
    except TrainingUnavailableError as e:
        ort_reason = str(e)
    return {"portable": None, "ort-training": ort_reason}


def resolve_backend(requested: BackendChoice) -> Backend:
    """The concrete backend for ``requested``; TrainingUnavailableError if it cannot run here."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"trainer.backend must be one of {list(BACKEND_CHOICES)}, got {requested!r}")
    reasons = available_backends()
    if requested == "auto":
        return next(b for b in AUTO_PREFERENCE if reasons[b] is None)
    reason = reasons[requested]
    if reason is not None:
        raise TrainingUnavailableError(f"trainer.backend {requested!r} cannot run here: {reason}; "
                                       "trainer.backend: portable (or auto) trains on this onnxruntime")
    return requested


def open_stepper(
    artifacts: TrainingArtifacts, *, learning_rate: float, dp: DPSettings | None, noise: GaussianNoise | None,
    expected_batch_size: float | None = None, device: Literal["cpu", "cuda"] = "cpu", intra_op_threads: int = 0,
    resume_from: Path | None = None, max_part_rows: int | None = None,
) -> Stepper:
    """The stepper of the backend the artifacts were built for. (The privacy audit opens
    its portable stepper itself, with canaries: trainer/audit.py.) ``max_part_rows``: the
    portable stepper's parts (trainer/portable.py); the ort-training backend takes each
    batch whole."""
    assert artifacts.backend in BACKENDS
    if artifacts.backend == "portable":
        from .portable import PortableStepper

        return PortableStepper(artifacts, learning_rate=learning_rate, dp=dp, noise=noise,
                               expected_batch_size=expected_batch_size, device=device,
                               intra_op_threads=intra_op_threads, resume_from=resume_from,
                               max_part_rows=max_part_rows)
    from .dp_step import DPStepper

    return DPStepper(artifacts, learning_rate=learning_rate, dp=dp, noise=noise,
                     expected_batch_size=expected_batch_size, device=device, intra_op_threads=intra_op_threads,
                     resume_from=resume_from)
