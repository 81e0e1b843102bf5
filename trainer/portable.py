"""The portable training backend's stepper: the step graph in a plain InferenceSession.

:class:`PortableStepper` has :class:`lorad.trainer.dp_step.DPStepper`'s interface and runs the
step graph of :mod:`lorad.trainer.portable_graph` with ``onnxruntime.InferenceSession`` of any
current version, on the execution provider the ``device`` setting names (CPU, or CUDA on
Jetson: one code path, the provider is the only difference). The state of a run is three
flat float32 vectors (parameters and AdamW's two moments) and the step count; each step
feeds them in and keeps what the graph returns. The empty-batch rule is the ort-training
backend's: one all-zero placeholder example with C = 0, so the update is the noise alone.

With ``canaries`` (the privacy audit, trainer/audit.py) the stepper runs the audit's variant of
the step graph (:func:`lorad.trainer.portable_graph.with_canary_rows`): each step the feed's
gradient rows are clipped, summed and noised with the batch's examples, and the feed is
shown what the step released (the noised clipped sum) and the examples' own clipped sum.
An empty batch then feeds its placeholder with weight 0 instead of C = 0, so that the
canaries are still clipped to C.

The noise of step t+1 is drawn on the host while step t's graph runs (ONNX Runtime
releases the GIL during ``run``), from the same source in the same order as without the
overlap; a drawn vector is used by exactly one step, and one drawn for a step that never
comes is dropped.

With ``max_part_rows`` a step whose batch has more rows than that runs in parts of whole
examples (a language model's example is several window rows): each part's clipped sum
comes out of the graph and is carried, in float64, into the next part's run; the last part
adds the noise, scales and updates. The update is the one of the whole batch at once (up
to float32 rounding of each part's sum); only the memory of one part's activations is
needed. The graph's sessions keep constant folding off when the base is quantised
(``MatMulNBits``): folding would store a float32 copy of every dequantised weight that
the backward pass multiplies by.

A checkpoint is one ``.npz`` (parameters, moments, steps, a format tag), written atomically.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from lorad.adapters.fsutil import fsync_dir
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.lora_graph import lora_input_names

from .artifacts import CLIP_NORM_INPUT, GRAD_SCALE_INPUT, NOISE_INPUT, TrainingArtifacts
from .dp_step import DPSettings, GaussianNoise, StepResult, check_batch, check_settings, draw_noise, placeholder_batch
from .errors import TrainingFailedError
from .portable_graph import (
    CANARY_ROWS_INPUT,
    CARRIED_SUM_INPUT,
    EXAMPLE_INDEX_INPUT,
    EXAMPLE_WEIGHT_INPUT,
    EXAMPLES_SUM_OUTPUT,
    GRAD_OUTPUT,
    LEARNING_RATE_INPUT,
    LOSS_OUTPUT,
    MOMENT1_INPUT,
    MOMENT1_OUTPUT,
    MOMENT2_INPUT,
    MOMENT2_OUTPUT,
    PARAMS_INPUT,
    PARAMS_OUTPUT,
    PART_SUM_OUTPUT,
    STEP_INPUT,
    with_canary_rows,
)

__all__ = ["PortableStepper", "CanaryFeed", "execution_providers", "write_checkpoint"]

_CHECKPOINT_FORMAT = "lorad-portable-checkpoint-v1"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def execution_providers(device: str) -> list[str]:
    """ORT providers for ``device``; an unavailable one is an error, never a silent fallback."""
    import onnxruntime

    if device not in _PROVIDERS:
        raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
    wanted = _PROVIDERS[device]
    available = onnxruntime.get_available_providers()
    if wanted not in available:
        raise TrainingFailedError(
            f"trainer.device {device!r} needs ONNX Runtime's {wanted}, which this onnxruntime "
            f"{onnxruntime.__version__} does not have (available: {available})"
        )
    # CPU last: ORT places the few shape ops a CUDA kernel lacks there.
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


class CanaryFeed(Protocol):
    """The privacy audit's side of each step (see the module docstring)."""

    def rows(self) -> np.ndarray:
        """This step's extra per-example gradient rows: float32 [M, P], M >= 0."""
        ...

    def observe(self, released: np.ndarray, examples: np.ndarray) -> None:
        """The step's noised clipped sum before scaling, and the examples' share of the
        clipped sum (float64 [P] each)."""
        ...


class PortableStepper:
    """DP-SGD (or plain) steps of one run; see the module docstring."""

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
        canaries: CanaryFeed | None = None,
        max_part_rows: int | None = None,
    ) -> None:
        if max_part_rows is not None and max_part_rows < 1:
            raise ValueError(f"max_part_rows must be >= 1 or None, got {max_part_rows}")
        self._max_part_rows = max_part_rows
        if artifacts.backend != "portable":
            raise ValueError(f"PortableStepper needs portable artifacts, got {artifacts.backend!r} ones")
        self._grad_scale = check_settings(artifacts, learning_rate=learning_rate, dp=dp, noise=noise,
                                          expected_batch_size=expected_batch_size, device=device,
                                          intra_op_threads=intra_op_threads)
        self._artifacts = artifacts
        self._dp = dp
        self._noise = noise
        if canaries is not None and dp is None:
            raise ValueError("canaries need private artifacts (dp settings and a noise source)")
        self._canaries = canaries
        self._lr = np.array(learning_rate, np.float32)
        self._adamw = artifacts.config.optimizer == "adamw"
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Serving and training share few cores; spinning threads would steal them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._disabled: list[str] = []
        if artifacts.quantized_base:
            # See the module docstring: no float32 copies of a quantised base's weights. And
            # no memory pattern: it keeps a second planned block per batch shape (measured
            # on SmolLM2, one 64-token window: 1.43 GB peak with it, 0.77 GB without).
            self._disabled = ["ConstantFolding"]
            options.enable_mem_pattern = False
        self._options = options
        self._providers = execution_providers(device)
        try:
            if canaries is None:
                self._session = onnxruntime.InferenceSession(os.fspath(artifacts.step_model), options,
                                                             providers=self._providers,
                                                             disabled_optimizers=self._disabled)
            else:
                import onnx

                variant = with_canary_rows(onnx.load(os.fspath(artifacts.step_model)), artifacts.trainable)
                self._session = onnxruntime.InferenceSession(variant.SerializeToString(), options,
                                                             providers=self._providers,
                                                             disabled_optimizers=self._disabled)
        except Exception as e:
            raise TrainingFailedError(f"could not load the training step graph {artifacts.step_model}: {e}") from e
        self._eval_session: Any = None
        self._drawer: ThreadPoolExecutor | None = None
        self._next_noise: Future[np.ndarray] | None = None
        size = artifacts.noise_size
        if resume_from is not None:
            self._params, self._m, self._v, self._steps = _load_checkpoint(Path(resume_from), size)
        else:
            self._params = np.load(artifacts.initial_parameters).astype(np.float32)
            self._m = np.zeros(size, np.float32)
            self._v = np.zeros(size, np.float32)
            self._steps = 0
        if self._params.shape != (size,):
            raise TrainingFailedError(f"parameters have shape {self._params.shape}, the step graph needs ({size},); "
                                      "delete the artifact cache entry")
        with np.load(artifacts.directory / "frozen_parameters.npz") as frozen:
            self._frozen = {name: np.array(frozen[name], np.float32) for name in artifacts.frozen}

    @property
    def steps(self) -> int:
        """Optimizer steps taken (including those before a resume)."""
        return self._steps

    def step(self, batch: Mapping[str, np.ndarray]) -> StepResult:
        """One DP-SGD (or plain) update from one Poisson-sampled batch (may be empty)."""
        feeds, n = check_batch(self._artifacts, batch)
        clip_norm = self._dp.clip_norm if self._dp is not None else math.inf
        scale = self._grad_scale
        canaries = self._canaries
        examples = _examples_of(feeds, n)
        if n == 0:
            feeds = placeholder_batch(self._artifacts)
            if canaries is None:
                clip_norm = 0.0  # the placeholder's clip factor min(1, 0/norm) is exactly 0
            if self._dp is None:
                scale = np.array(0.0, np.float32)
        *parts, last = split_parts(feeds, self._max_part_rows)
        common = {GRAD_SCALE_INPUT: scale, PARAMS_INPUT: self._params, LEARNING_RATE_INPUT: self._lr}
        if self._dp is not None:
            common[CLIP_NORM_INPUT] = np.array(clip_norm, np.float32)
        if self._adamw:
            common.update({STEP_INPUT: np.array(self._steps + 1, np.float32), MOMENT1_INPUT: self._m,
                           MOMENT2_INPUT: self._v})
        carried = np.zeros(self._artifacts.noise_size, np.float64)
        loss = 0.0
        for part in parts:  # every part but the last: its clipped sum only
            part_feeds = {**part, **common, CARRIED_SUM_INPUT: carried}
            if self._dp is not None:
                part_feeds[NOISE_INPUT] = carried  # zeros: the last part adds the noise
            if canaries is not None:
                part_feeds[CANARY_ROWS_INPUT] = np.zeros((0, self._artifacts.noise_size), np.float32)
                part_feeds[EXAMPLE_WEIGHT_INPUT] = np.array(1.0, np.float32)
            part_loss, part_sum = self._run([LOSS_OUTPUT, PART_SUM_OUTPUT], part_feeds)
            loss += float(part_loss)
            carried = carried + part_sum
        feeds = {**last, **common, CARRIED_SUM_INPUT: carried}
        if self._dp is not None:
            feeds[NOISE_INPUT] = self._take_noise()
        outputs = [LOSS_OUTPUT, PARAMS_OUTPUT]
        if self._adamw:
            outputs += [MOMENT1_OUTPUT, MOMENT2_OUTPUT]
        if canaries is not None:
            feeds[CANARY_ROWS_INPUT] = _canary_rows(canaries.rows(), self._artifacts.noise_size)
            # The placeholder of an empty batch is cancelled by weight 0 (not C = 0, which
            # would cancel the canaries too).
            feeds[EXAMPLE_WEIGHT_INPUT] = np.array(1.0 if n else 0.0, np.float32)
            outputs += [GRAD_OUTPUT, EXAMPLES_SUM_OUTPUT]
        got = self._run(outputs, feeds)
        self._params = got[1]
        if self._adamw:
            self._m, self._v = got[2], got[3]
        if canaries is not None:
            released = np.asarray(got[-2], np.float64) / float(scale)
            canaries.observe(released, np.asarray(got[-1], np.float64) + carried)
        self._steps += 1
        return StepResult(step=self._steps, batch_size=examples, loss_sum=loss + float(got[0]) if n else 0.0)

    def _run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self._session.run(outputs, feeds))
        except Exception as e:
            raise TrainingFailedError(f"training step {self._steps + 1} failed: {e}") from e

    def _take_noise(self) -> np.ndarray:
        """This step's noise (drawn during the previous step), and the next step's drawing started."""
        dp, source, size = self._dp, self._noise, self._artifacts.noise_size
        assert dp is not None and source is not None
        pending, self._next_noise = self._next_noise, None
        noise = pending.result() if pending is not None else draw_noise(source, dp, size)
        if self._drawer is None:
            self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorad-noise")
        self._next_noise = self._drawer.submit(draw_noise, source, dp, size)
        return noise

    def close(self) -> None:
        """Stop the noise-drawing thread; safe to call twice."""
        if self._drawer is not None:
            self._drawer.shutdown(wait=True, cancel_futures=True)
            self._drawer, self._next_noise = None, None

    def gradient(self, batch: Mapping[str, np.ndarray], *, clip_norm: float, noise: np.ndarray | None = None,
                 grad_scale: float = 1.0) -> tuple[np.ndarray, float]:
        """The update's gradient (clipped sum + noise, scaled) and the summed loss, without
        taking the step: for tests and the benchmark's cross-backend comparison."""
        feeds, _n = check_batch(self._artifacts, batch)
        feeds.update({GRAD_SCALE_INPUT: np.array(grad_scale, np.float32), PARAMS_INPUT: self._params,
                      LEARNING_RATE_INPUT: self._lr,
                      CARRIED_SUM_INPUT: np.zeros(self._artifacts.noise_size, np.float64)})
        if self._artifacts.config.private:
            feeds[CLIP_NORM_INPUT] = np.array(clip_norm, np.float32)
            feeds[NOISE_INPUT] = noise if noise is not None else np.zeros(self._artifacts.noise_size, np.float64)
        if self._canaries is not None:
            feeds[CANARY_ROWS_INPUT] = np.zeros((0, self._artifacts.noise_size), np.float32)
            feeds[EXAMPLE_WEIGHT_INPUT] = np.array(1.0, np.float32)
        if self._adamw:
            feeds.update({STEP_INPUT: np.array(self._steps + 1, np.float32), MOMENT1_INPUT: self._m,
                          MOMENT2_INPUT: self._v})
        grad, loss = self._session.run([GRAD_OUTPUT, LOSS_OUTPUT], feeds)
        return grad, float(loss)

    def save_checkpoint(self, path: Path) -> None:
        """Write parameters, optimizer state and step count to ``path``, atomically."""
        write_checkpoint(path, self._params, self._m, self._v, self._steps)

    def parameters(self) -> dict[str, np.ndarray]:
        """Current values of every LoRA tensor (trainable and frozen), by name."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self._artifacts.trainable:
            size = int(np.prod(shape))
            out[name] = self._params[offset: offset + size].reshape(shape).copy()
            offset += size
        out.update({name: value.copy() for name, value in self._frozen.items()})
        return out

    def export_adapter(self, *, extra: Mapping[str, str] | None = None) -> LoraAdapter:
        """The trained LoRA matrices as an adapter for the base model the artifacts came from."""
        a = self._artifacts
        values = self.parameters()
        weights = {}
        for t in a.targets:
            a_name, b_name = lora_input_names(t.weight)
            weights[t.weight] = LoraWeights(values[a_name], values[b_name])
        return LoraAdapter(rank=a.config.rank, alpha=a.config.alpha, weights=weights,
                           base_fingerprint=a.base_fingerprint, use_rslora=a.config.use_rslora,
                           extra=dict(extra or {}))

    def eval_loss_sum(self, batch: Mapping[str, np.ndarray]) -> float:
        """Summed loss of ``batch`` under the current parameters (no update)."""
        feeds, n = check_batch(self._artifacts, batch)
        if n == 0:
            return 0.0
        if self._eval_session is None:
            import onnxruntime

            self._eval_session = onnxruntime.InferenceSession(
                os.fspath(self._artifacts.eval_model), self._options, providers=self._providers,
                disabled_optimizers=self._disabled)
        feeds[PARAMS_INPUT] = self._params
        try:
            (loss,) = self._eval_session.run([LOSS_OUTPUT], feeds)
        except Exception as e:
            raise TrainingFailedError(f"evaluation failed: {e}") from e
        return float(loss)


def _examples_of(feeds: Mapping[str, np.ndarray], rows: int) -> int:
    """How many examples ``rows`` rows are: one each, or a language model's example indices."""
    index = feeds.get(EXAMPLE_INDEX_INPUT)
    return int(index.max()) + 1 if index is not None and rows else rows


def split_parts(feeds: Mapping[str, np.ndarray], max_rows: int | None) -> list[dict[str, np.ndarray]]:
    """The batch in consecutive parts of whole examples, each at most ``max_rows`` rows (an
    example with more rows is a part of its own); example indices restart at 0 in each."""
    index = feeds.get(EXAMPLE_INDEX_INPUT)
    rows = next(iter(feeds.values())).shape[0] if feeds else 0
    if max_rows is None or rows <= max_rows:
        return [dict(feeds)]
    of_row = index if index is not None else np.arange(rows)
    starts = np.flatnonzero(np.r_[True, of_row[1:] != of_row[:-1]])  # each example's first row
    ends = np.r_[starts[1:], rows]
    bounds = [0]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if start > bounds[-1] and end - bounds[-1] > max_rows:
            bounds.append(start)
    bounds.append(rows)
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part = {name: value[lo:hi] for name, value in feeds.items()}
        if index is not None:
            part[EXAMPLE_INDEX_INPUT] = index[lo:hi] - index[lo]
        parts.append(part)
    return parts


def _canary_rows(rows: np.ndarray, size: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, np.float32)
    if rows.ndim != 2 or rows.shape[1] != size or not np.all(np.isfinite(rows)):
        raise ValueError(f"canary rows must be finite float32 [M, {size}], got shape {list(rows.shape)}")
    return rows


def write_checkpoint(path: Path, params: np.ndarray, moment1: np.ndarray, moment2: np.ndarray, steps: int) -> None:
    """A checkpoint the stepper resumes from (``resume_from``), written atomically: the
    flat parameter vector in the artifacts' trainable order, the optimiser moments and
    the step count."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array(_CHECKPOINT_FORMAT), params=params, moment1=moment1,
             moment2=moment2, steps=np.array(steps, np.int64))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise TrainingFailedError(f"could not write the training checkpoint {path}: {e}") from e


def _load_checkpoint(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        with np.load(path, allow_pickle=False) as doc:
            if str(doc["format"]) != _CHECKPOINT_FORMAT:
                raise ValueError(f"format {str(doc['format'])!r}, expected {_CHECKPOINT_FORMAT!r}")
            arrays = [np.array(doc[k], np.float32) for k in ("params", "moment1", "moment2")]
            steps = int(doc["steps"])
    except (OSError, ValueError, KeyError) as e:
        raise TrainingFailedError(f"cannot read the training checkpoint {path}: {e}") from e
    if any(a.shape != (size,) for a in arrays) or steps < 0:
        raise TrainingFailedError(f"the training checkpoint {path} does not fit these artifacts "
                                  f"(vectors of {[a.shape for a in arrays]}, expected ({size},))")
    return arrays[0], arrays[1], arrays[2], steps
