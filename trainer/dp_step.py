"""DP-SGD steps in ONNX Runtime: one Poisson-sampled batch in, one optimizer update out.

:class:`DPStepper` drives ORT's on-device training API (Module, Optimizer,
CheckpointState) over artifacts from :func:`lorad.trainer.artifacts.build_artifacts`. The
caller does the Poisson sampling (each example included independently with
probability q), so batches have any size, including zero. Per step the stepper

1. draws the noise vector N(0, σ²C²) for every trainable LoRA parameter from the
   injected noise source,
2. feeds the batch, C, the noise and the scale 1/(expected batch size) to the training
   graph, which clips each example's gradient to C, sums, adds the noise and scales
   (see trainer/artifacts.py), and
3. applies the stock optimizer.

An empty batch still takes a step: the graph cannot run on zero examples, so one
all-zero placeholder example is fed with C = 0, which multiplies its gradient by exactly
zero; the update is then the scaled noise alone, as DP-SGD prescribes. Gradient buffers
are reset (lazily) before every forward pass, so a step can only ever apply the gradient
of its own batch.

Non-private artifacts take the same steps without clipping and noise (the benchmark's
baseline).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from lorad.adapters.fsutil import fsync_dir
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.lora_graph import lora_input_names

from ._ort_training import load as _load_ort_training
from .artifacts import CLIP_NORM_INPUT, GRAD_SCALE_INPUT, NOISE_INPUT, TrainingArtifacts
from .errors import BadTrainingDataError, TrainingFailedError

__all__ = ["GaussianNoise", "DPSettings", "StepResult", "DPStepper", "check_settings", "check_batch", "placeholder_batch", "draw_noise"]

_STEPS_PROPERTY = "lorad.steps"
_DEVICES = ("cpu", "cuda")  # ORT execution providers: CPU, CUDA (Jetson)


class GaussianNoise(Protocol):
    """What the stepper needs of a noise source (trainer.noise.NoiseSource)."""

    def gaussian64(self, n: int, std: float) -> np.ndarray: ...


@dataclass(frozen=True)
class DPSettings:
    """The numbers of one DP-SGD configuration.

    ``noise_multiplier`` σ (noise std is σ·C), ``clip_norm`` C (flat L2 norm over all
    LoRA parameters of one example), ``expected_batch_size`` q·n (the clipped, noised
    sum is divided by it). ``clip_norm=math.inf`` with ``noise_multiplier=0`` turns the
    private graph into plain training (for tests and comparisons; it is not private, and
    the accountant gives ε = ∞ for σ = 0).
    """

    noise_multiplier: float
    clip_norm: float
    expected_batch_size: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier σ must be a finite number >= 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm C must be > 0, got {self.clip_norm}")
        if self.noise_multiplier > 0 and not math.isfinite(self.clip_norm):
            raise ValueError("clip_norm C must be finite when noise_multiplier σ > 0 (noise std is σ·C)")
        if not (self.expected_batch_size > 0 and math.isfinite(self.expected_batch_size)):
            raise ValueError(
                f"expected_batch_size (q·n) must be a finite number > 0, got {self.expected_batch_size}"
            )


@dataclass(frozen=True)
class StepResult:
    """``loss_sum``: the batch's summed loss. It is computed from private data without
    noise: use it for tests and benchmarks, never release or log it."""

    step: int
    batch_size: int
    loss_sum: float


class DPStepper:
    """Owns one ORT training session over one set of artifacts.

    ``dp`` and ``noise`` are required for private artifacts and refused for non-private
    ones (which scale the summed gradient by 1/``expected_batch_size``).
    ``resume_from`` loads a checkpoint written by :meth:`save_checkpoint` (parameters,
    optimizer state, step count) instead of the artifacts' initial checkpoint.
    ``device`` selects the ORT execution provider ("cpu" or "cuda").
    """

    def __init__(
        self,
        artifacts: TrainingArtifacts,
        *,
        learning_rate: float,
        dp: DPSettings | None,
        noise: GaussianNoise | None,
        expected_batch_size: float | None = None,
        device: Literal["cpu", "cuda"] = "cpu",
        intra_op_threads: int = 0,
        resume_from: Path | None = None,
    ) -> None:
        self._artifacts = artifacts
        self._dp = dp
        self._noise = noise
        self._grad_scale = check_settings(artifacts, learning_rate=learning_rate, dp=dp, noise=noise,
                                          expected_batch_size=expected_batch_size, device=device,
                                          intra_op_threads=intra_op_threads)
        private = artifacts.config.private

        import onnxruntime

        api = _load_ort_training().api
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Serving and training sessions share few cores; spinning threads would steal them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        checkpoint = Path(resume_from) if resume_from is not None else artifacts.checkpoint
        try:
            self._state = api.CheckpointState.load_checkpoint(os.fspath(checkpoint))
            self._module = api.Module(
                os.fspath(artifacts.training_model), self._state, os.fspath(artifacts.eval_model),
                device=device, session_options=options,
            )
            self._optimizer = api.Optimizer(os.fspath(artifacts.optimizer_model), self._module)
        except Exception as e:
            raise TrainingFailedError(f"could not start ORT training from {checkpoint}: {e}") from e
        self._optimizer.set_learning_rate(float(learning_rate))
        self._input_order = list(self._module.input_names())
        expected = set(artifacts.data_inputs) | {GRAD_SCALE_INPUT}
        if private:
            expected |= {CLIP_NORM_INPUT, NOISE_INPUT}
        if set(self._input_order) != expected:
            raise TrainingFailedError(
                f"training model inputs {self._input_order} differ from the expected {sorted(expected)}; "
                "delete the artifact cache entry"
            )
        props = self._state.properties
        self._steps = int(props[_STEPS_PROPERTY]) if _STEPS_PROPERTY in props else 0

    @property
    def steps(self) -> int:
        """Optimizer steps taken (including those before a resume)."""
        return self._steps

    def step(self, batch: Mapping[str, np.ndarray]) -> StepResult:
        """One DP-SGD (or plain) update from one Poisson-sampled batch (may be empty)."""
        feeds, n = self._check_batch(batch)
        clip_norm = self._dp.clip_norm if self._dp is not None else math.inf
        scale = self._grad_scale
        if n == 0:
            feeds = self._placeholder_batch()
            clip_norm = 0.0  # the placeholder's clip factor min(1, 0/norm) is exactly 0
            if self._dp is None:
                scale = np.array(0.0, np.float32)
        feeds[GRAD_SCALE_INPUT] = scale
        if self._dp is not None:
            assert self._noise is not None
            feeds[CLIP_NORM_INPUT] = np.array(clip_norm, np.float32)
            feeds[NOISE_INPUT] = self._draw_gaussian()
        try:
            self._module.train()
            self._module.lazy_reset_grad()
            loss = self._module(*[feeds[name] for name in self._input_order])
            self._optimizer.step()
        except Exception as e:
            raise TrainingFailedError(f"ORT training step {self._steps + 1} failed: {e}") from e
        self._steps += 1
        loss_value = np.asarray(loss[0] if isinstance(loss, tuple) else loss)
        return StepResult(step=self._steps, batch_size=n, loss_sum=float(loss_value.sum()) if n else 0.0)

    def _draw_gaussian(self) -> np.ndarray:
        assert self._dp is not None and self._noise is not None
        return draw_noise(self._noise, self._dp, self._artifacts.noise_size)

    def _check_batch(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        return check_batch(self._artifacts, batch)

    def _placeholder_batch(self) -> dict[str, np.ndarray]:
        return placeholder_batch(self._artifacts)

    def save_checkpoint(self, path: Path) -> None:
        """Write parameters, optimizer state and step count to ``path``, atomically."""
        path = Path(path)
        self._state.properties[_STEPS_PROPERTY] = self._steps
        api = _load_ort_training().api
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            api.CheckpointState.save_checkpoint(self._state, tmp, include_optimizer_state=True)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            raise TrainingFailedError(f"could not write the training checkpoint {path}: {e}") from e

    def parameters(self) -> dict[str, np.ndarray]:
        """Current values of every LoRA tensor (trainable and frozen), by name."""
        params = self._state.parameters
        names = [name for name, _ in self._artifacts.trainable] + list(self._artifacts.frozen)
        return {name: np.array(params[name].data, dtype=np.float32) for name in names}

    def export_adapter(self, *, extra: Mapping[str, str] | None = None) -> LoraAdapter:
        """The trained LoRA matrices as an adapter for the base model the artifacts came from."""
        a = self._artifacts
        values = self.parameters()
        weights = {}
        for t in a.targets:
            a_name, b_name = lora_input_names(t.weight)
            weights[t.weight] = LoraWeights(values[a_name], values[b_name])
        return LoraAdapter(
            rank=a.config.rank,
            alpha=a.config.alpha,
            weights=weights,
            base_fingerprint=a.base_fingerprint,
            use_rslora=a.config.use_rslora,
            extra=dict(extra or {}),
        )

    def eval_loss_sum(self, batch: Mapping[str, np.ndarray]) -> float:
        """Summed loss of ``batch`` under the current parameters (no update)."""
        feeds, n = self._check_batch(batch)
        if n == 0:
            return 0.0
        try:
            self._module.eval()
            loss: Any = self._module(*[feeds[name] for name in self._module.input_names()])
        except Exception as e:
            raise TrainingFailedError(f"ORT evaluation failed: {e}") from e
        finally:
            self._module.train()
        return float(np.asarray(loss[0] if isinstance(loss, tuple) else loss).sum())


# -- shared by both backends' steppers (trainer/portable.py) ---------------------------------

def check_settings(
    artifacts: TrainingArtifacts, *, learning_rate: float, dp: DPSettings | None, noise: GaussianNoise | None,
    expected_batch_size: float | None, device: str, intra_op_threads: int,
) -> np.ndarray:
    """Refuse inconsistent stepper arguments; returns the gradient scale 1/(q·n) as a float32 scalar."""
    private = artifacts.config.private
    if private and (dp is None or noise is None):
        raise ValueError("private training artifacts need dp=DPSettings(...) and a noise source")
    if not private and (dp is not None or noise is not None):
        raise ValueError("non-private training artifacts take no dp settings or noise source")
    if not private and not (expected_batch_size and expected_batch_size > 0):
        raise ValueError("non-private training needs expected_batch_size > 0 (the gradient is divided by it)")
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {list(_DEVICES)}, got {device!r}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
    if intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be >= 0 (0 = ORT's default), got {intra_op_threads}")
    return np.array(1.0 / (dp.expected_batch_size if dp is not None else float(expected_batch_size or 1.0)), np.float32)


def draw_noise(noise: GaussianNoise, dp: DPSettings, size: int) -> np.ndarray:
    """The step's float64 noise vector N(0, (σC)²) of ``size`` entries, checked."""
    if dp.noise_multiplier == 0.0:  # also with C = inf, where σ·C would be NaN
        return np.zeros(size, np.float64)
    # float64: the graph adds it to the widened clipped sum and rounds once.
    values = np.asarray(noise.gaussian64(size, dp.noise_multiplier * dp.clip_norm), np.float64)
    if values.shape != (size,) or not np.all(np.isfinite(values)):
        raise TrainingFailedError(
            f"noise source returned shape {values.shape} or non-finite values; expected ({size},), finite"
        )
    return values


def check_batch(a: TrainingArtifacts, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The batch as contiguous feeds and its size; BadTrainingDataError naming what does not fit."""
    names = set(batch)
    if names != set(a.data_inputs):
        raise BadTrainingDataError(
            f"a training batch needs exactly the inputs {list(a.data_inputs)}, got {sorted(names)}"
        )
    feeds: dict[str, np.ndarray] = {}
    sizes = set()
    for name, dtype, shape in zip(a.data_inputs, a.input_dtypes, a.input_shapes, strict=True):
        value = np.asarray(batch[name])
        if value.dtype != np.dtype(dtype):
            raise BadTrainingDataError(f"training input {name!r} has dtype {value.dtype}, expected {dtype}")
        if value.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(value.shape[1:], shape[1:], strict=True)
        ):
            raise BadTrainingDataError(
                f"training input {name!r} has shape {list(value.shape)}, expected "
                f"{['N' if d is None else d for d in shape]}"
            )
        sizes.add(value.shape[0])
        feeds[name] = np.ascontiguousarray(value)
    if len(sizes) != 1:
        raise BadTrainingDataError(f"training inputs disagree on the batch size: {sorted(sizes)}")
    n = sizes.pop()
    labels = feeds.get(a.label_input) if n else None
    if labels is not None and np.issubdtype(labels.dtype, np.floating) and not np.all(np.isfinite(labels)):
        raise BadTrainingDataError(f"training input {a.label_input!r} has non-finite values")
    return feeds, n


def placeholder_batch(a: TrainingArtifacts) -> dict[str, np.ndarray]:
    """One all-zero example: what an empty batch feeds (with C = 0, so it contributes exactly 0)."""
    return {
        name: np.zeros([1, *(d if d is not None else 1 for d in shape[1:])], dtype=np.dtype(dtype))
        for name, dtype, shape in zip(a.data_inputs, a.input_dtypes, a.input_shapes, strict=True)
    }
