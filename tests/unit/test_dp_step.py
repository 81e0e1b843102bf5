"""The DP-SGD step driver: equivalence with plain training, noise, empty batches,
checkpoint resume and adapter export."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from lorad.adapters.lora_graph import find_targets, lora_input_names, make_inference_graph
from lorad.trainer.artifacts import ArtifactConfig, TrainingArtifacts, build_artifacts
from lorad.trainer.dp_step import DPSettings, DPStepper
from lorad.trainer.errors import BadTrainingDataError
from lorad.trainer.noise import SeededNoise

_CONFIG = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=4, alpha=8.0)
_SEQ, _D, _CLASSES = 4, 32, 5


# ONNX Runtime's training API: these tests run in .venv-ort-training (see the README).
pytestmark = pytest.mark.ort_training

class _FixedNoise:
    """Returns a known noise vector and records what it was asked for."""

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector
        self.calls: list[tuple[int, float]] = []

    def gaussian64(self, n: int, std: float) -> np.ndarray:
        self.calls.append((n, std))
        return (self.vector[:n] * std).astype(np.float64)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return build_reference_encoder(d_model=_D, heads=2, ffn=64, seq_len=_SEQ, num_classes=_CLASSES)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifact-cache")


def _artifacts(model: onnx.ModelProto, cache: Path, **changes: Any) -> TrainingArtifacts:
    return build_artifacts(model, dataclasses.replace(_CONFIG, **changes), cache_dir=cache)


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": (rng.standard_normal((n, _SEQ, _D)) * 2).astype(np.float32),
        "labels": rng.integers(0, _CLASSES, n).astype(np.int64),
    }


def _assert_params_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_no_clipping_and_no_noise_equals_non_private_training(model: onnx.ModelProto, cache: Path) -> None:
    private = DPStepper(
        _artifacts(model, cache), learning_rate=0.01,
        dp=DPSettings(noise_multiplier=0.0, clip_norm=math.inf, expected_batch_size=4.0), noise=SeededNoise(0),
    )
    plain = DPStepper(
        _artifacts(model, cache, private=False), learning_rate=0.01, dp=None, noise=None, expected_batch_size=4.0
    )
    for k, n in enumerate([4, 2, 5, 3]):
        batch = _batch(n, seed=k)
        a, b = private.step(batch), plain.step(batch)
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
    trained = plain.parameters()
    assert any(np.any(v != 0) for name, v in trained.items() if name.endswith(".B"))
    _assert_params_close(private.parameters(), trained)


def test_update_is_clipped_sum_plus_noise_scaled(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = _artifacts(model, cache, optimizer="sgd")
    vector = np.random.default_rng(1).standard_normal(artifacts.noise_size).astype(np.float32)
    noise = _FixedNoise(vector)
    dp = DPSettings(noise_multiplier=0.5, clip_norm=2.0, expected_batch_size=8.0)
    lr = 0.1
    stepper = DPStepper(artifacts, learning_rate=lr, dp=dp, noise=noise)
    reference = DPStepper(
        artifacts, learning_rate=lr, dp=dataclasses.replace(dp, noise_multiplier=0.0), noise=_FixedNoise(vector)
    )
    batch = _batch(3, seed=5)
    before = stepper.parameters()
    stepper.step(batch)
    reference.step(batch)
    assert noise.calls == [(artifacts.noise_size, 0.5 * 2.0)]
    noisy, clean = stepper.parameters(), reference.parameters()
    offset = 0
    for name, shape in artifacts.trainable:
        size = int(np.prod(shape))
        added = vector[offset : offset + size].reshape(shape) * 1.0 / 8.0
        # SGD: new = old - lr * (clipped_sum + noise) / expected_batch_size
        np.testing.assert_allclose(noisy[name] - clean[name], -lr * added, atol=1e-6, err_msg=name)
        offset += size
    assert any(np.any(noisy[n] != before[n]) for n in noisy)


def test_empty_batch_still_adds_noise_and_counts(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = _artifacts(model, cache, optimizer="sgd")
    vector = np.random.default_rng(2).standard_normal(artifacts.noise_size).astype(np.float32)
    dp = DPSettings(noise_multiplier=1.5, clip_norm=0.5, expected_batch_size=4.0)
    stepper = DPStepper(artifacts, learning_rate=0.2, dp=dp, noise=_FixedNoise(vector))
    before = stepper.parameters()
    result = stepper.step(_batch(0, seed=0))
    assert (result.step, result.batch_size, result.loss_sum) == (1, 0, 0.0)
    after = stepper.parameters()
    offset = 0
    for name, shape in artifacts.trainable:
        size = int(np.prod(shape))
        expected = -0.2 * vector[offset : offset + size].reshape(shape) * (1.5 * 0.5) / 4.0
        np.testing.assert_allclose(after[name] - before[name], expected, atol=1e-6, err_msg=name)
        offset += size
    assert stepper.steps == 1


def test_frozen_a_keeps_a(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = _artifacts(model, cache, freeze_a=True)
    stepper = DPStepper(
        artifacts, learning_rate=0.05,
        dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4.0), noise=SeededNoise(3),
    )
    before = stepper.parameters()
    for k in range(3):
        stepper.step(_batch(4, seed=10 + k))
    after = stepper.parameters()
    for name in before:
        if name.endswith(".A"):
            np.testing.assert_array_equal(after[name], before[name])
        else:
            assert np.any(after[name] != before[name])


def test_checkpoint_resume_continues_identically(model: onnx.ModelProto, cache: Path, tmp_path: Path) -> None:
    artifacts = _artifacts(model, cache)
    dp = DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4.0)
    batches = [_batch(4, seed=20 + k) for k in range(4)]
    first = DPStepper(artifacts, learning_rate=0.01, dp=dp, noise=SeededNoise(0))
    for batch in batches[:2]:
        first.step(batch)
    checkpoint = tmp_path / "ckpt"
    first.save_checkpoint(checkpoint)
    for batch in batches[2:]:
        first.step(batch)

    resumed = DPStepper(artifacts, learning_rate=0.01, dp=dp, noise=SeededNoise(0), resume_from=checkpoint)
    assert resumed.steps == 2
    for batch in batches[2:]:
        resumed.step(batch)
    assert resumed.steps == 4
    # Equality needs the AdamW moments and step count restored, not just the weights.
    _assert_params_close(resumed.parameters(), first.parameters())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_exported_adapter_serves_what_was_trained(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = _artifacts(model, cache)
    stepper = DPStepper(
        artifacts, learning_rate=0.05,
        dp=DPSettings(noise_multiplier=0.0, clip_norm=10.0, expected_batch_size=4.0), noise=SeededNoise(0),
    )
    for k in range(3):
        stepper.step(_batch(4, seed=30 + k))
    adapter = stepper.export_adapter()
    targets = find_targets(model, REFERENCE_TARGETS)
    assert adapter.rank == 4 and adapter.scale == 2.0 and set(adapter.weights) == {t.weight for t in targets}
    assert adapter.base_fingerprint == artifacts.base_fingerprint

    graph = make_inference_graph(model, targets, rank=4)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = _batch(5, seed=40)
    feeds: dict[str, np.ndarray] = {"x": batch["x"]}
    for t in targets:
        a_name, b_name = lora_input_names(t.weight)
        feeds[a_name] = adapter.weights[t.weight].A
        feeds[b_name] = adapter.weights[t.weight].B * adapter.scale
    logits = session.run(["logits"], feeds)[0].astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    want = -float(log_probs[np.arange(5), batch["labels"]].sum())
    assert stepper.eval_loss_sum(batch) == pytest.approx(want, rel=1e-4)


def test_bad_batches_are_refused(model: onnx.ModelProto, cache: Path) -> None:
    stepper = DPStepper(
        _artifacts(model, cache), learning_rate=0.01,
        dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4.0), noise=SeededNoise(0),
    )
    good = _batch(3, seed=0)
    with pytest.raises(BadTrainingDataError, match="inputs"):
        stepper.step({"x": good["x"]})
    with pytest.raises(BadTrainingDataError, match="dtype"):
        stepper.step({**good, "labels": good["labels"].astype(np.int32)})
    with pytest.raises(BadTrainingDataError, match="shape"):
        stepper.step({**good, "x": good["x"][:, :2]})
    with pytest.raises(BadTrainingDataError, match="batch size"):
        stepper.step({**good, "labels": good["labels"][:2]})
    assert stepper.steps == 0


def test_settings_and_modes_are_checked(model: onnx.ModelProto, cache: Path) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        DPSettings(noise_multiplier=1.0, clip_norm=0.0, expected_batch_size=1.0)
    with pytest.raises(ValueError, match="finite"):
        DPSettings(noise_multiplier=1.0, clip_norm=math.inf, expected_batch_size=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSettings(noise_multiplier=-1.0, clip_norm=1.0, expected_batch_size=1.0)
    with pytest.raises(ValueError, match="dp=DPSettings"):
        DPStepper(_artifacts(model, cache), learning_rate=0.01, dp=None, noise=None)
    with pytest.raises(ValueError, match="non-private"):
        DPStepper(
            _artifacts(model, cache, private=False), learning_rate=0.01,
            dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0), noise=SeededNoise(0),
        )
