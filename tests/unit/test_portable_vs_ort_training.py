"""The portable step graph against ONNX Runtime's training backend on the same model.

Both start from the same initial LoRA matrices; with σ = 0 they must compute the same
clipped gradient sums (to float32 precision) and the same updates, step after step. Runs
in .venv-ort-training, where both backends exist (the portable one runs on that
onnxruntime too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.trainer.artifacts import ArtifactConfig, build_artifacts
from lorad.trainer.dp_step import DPSettings, DPStepper
from lorad.trainer.portable import PortableStepper

from .trainer_helpers import CLASSES, SEQ, D, tiny_model

pytestmark = pytest.mark.ort_training


class _Zeros:
    def gaussian64(self, n: int, std: float) -> np.ndarray:
        return np.zeros(n)


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, SEQ, D)).astype(np.float32),
            "labels": rng.integers(0, CLASSES, n).astype(np.int64)}


def _pair(tmp_path: Path, optimizer: str, lr: float, clip: float) -> tuple[PortableStepper, DPStepper]:
    config = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=4, alpha=8.0, optimizer=optimizer,  # type: ignore[arg-type]
                            weight_decay=0.01 if optimizer == "adamw" else 0.0)
    dp = DPSettings(noise_multiplier=0.0, clip_norm=clip, expected_batch_size=8)
    portable = PortableStepper(build_artifacts(tiny_model(), config, cache_dir=tmp_path, backend="portable"),
                               learning_rate=lr, dp=dp, noise=_Zeros())
    ort = DPStepper(build_artifacts(tiny_model(), config, cache_dir=tmp_path, backend="ort-training"),
                    learning_rate=lr, dp=dp, noise=_Zeros())
    return portable, ort


def test_same_clipped_sums_and_sgd_updates(tmp_path: Path) -> None:
    portable, ort = _pair(tmp_path, "sgd", lr=1.0, clip=0.5)
    for step in range(3):
        batch = _batch(8, seed=step)
        before = {k: v.astype(np.float64) for k, v in ort.parameters().items()}
        clipped, _ = portable.gradient(batch, clip_norm=0.5, grad_scale=1 / 8)
        ort.step(batch)
        after = ort.parameters()
        # SGD with lr 1: what ORT subtracted is its clipped, scaled sum.
        offset = 0
        for name, shape in portable._artifacts.trainable:
            size = int(np.prod(shape))
            ort_grad = (before[name] - after[name]).reshape(-1)
            mine = clipped[offset: offset + size]
            np.testing.assert_allclose(mine, ort_grad, rtol=1e-4, atol=1e-6, err_msg=f"{name} at step {step}")
            offset += size
        portable.step(batch)
        for name, value in portable.parameters().items():
            np.testing.assert_allclose(value, after[name], rtol=1e-5, atol=1e-7, err_msg=f"{name} at step {step}")


def test_same_adamw_updates(tmp_path: Path) -> None:
    portable, ort = _pair(tmp_path, "adamw", lr=0.01, clip=0.5)
    for step in range(3):
        batch = _batch(8, seed=10 + step)
        portable.step(batch)
        ort.step(batch)
        mine, theirs = portable.parameters(), ort.parameters()
        for name in theirs:
            # AdamW divides by sqrt(v) + 1e-6: gradient entries that are zero up to rounding
            # move by up to ~lr·1e-3 either way in both backends; everything else agrees closely.
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-4, atol=2e-3 * 0.01,
                                       err_msg=f"{name} at step {step}")
