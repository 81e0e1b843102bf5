"""Per-example clipping in the ORT training graph against a batch-of-one reference.

As Opacus checks its per-sample gradients: every example's gradient is computed alone
(a batch of one through the same artifacts with clipping off and no noise), clipped in
numpy, summed, and compared with what the private graph computes for the whole batch.
Models: the reference encoder (LayerNorm, attention, GELU via Erf) and a small MLP with
a transposed Gemm on 2-D inputs (the reshape path of the surgery).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from lorad.trainer._ort_training import load as load_ort_training
from lorad.trainer.artifacts import (
    CLIP_NORM_INPUT,
    GRAD_SCALE_INPUT,
    NOISE_INPUT,
    ArtifactConfig,
    TrainingArtifacts,
    build_artifacts,
)

# ONNX Runtime's training API: these tests run in .venv-ort-training (see the README).
pytestmark = pytest.mark.ort_training


class _Session:
    """The private training graph's gradient, read straight from ORT (no optimizer step)."""

    def __init__(self, artifacts: TrainingArtifacts, seed: int) -> None:
        self.artifacts = artifacts
        self.state = load_ort_training().api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
        self.module = load_ort_training().api.Module(str(artifacts.training_model), self.state, str(artifacts.eval_model))
        # B starts at zero, which would make every gradient of A zero: randomise both.
        # (ORT crashes when parameters are set before a Module owns the state.)
        rng = np.random.default_rng(seed)
        for name, shape in artifacts.trainable:
            self.state.parameters[name] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        self.order = self.module.input_names()

    def gradient(
        self,
        batch: dict[str, np.ndarray],
        *,
        clip_norm: float,
        noise: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> dict[str, np.ndarray]:
        feeds: dict[str, Any] = dict(batch)
        feeds[CLIP_NORM_INPUT] = np.array(clip_norm, np.float32)
        feeds[NOISE_INPUT] = np.zeros(self.artifacts.noise_size, np.float64) if noise is None else noise.astype(np.float64)
        feeds[GRAD_SCALE_INPUT] = np.array(scale, np.float32)
        self.module.lazy_reset_grad()
        self.module(*[feeds[n] for n in self.order])
        return {name: self.state.parameters[name].grad.copy() for name, _ in self.artifacts.trainable}


def _reference_clipped_sum(
    session: _Session, batch: dict[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each example alone (batch of one, no clipping), clipped in numpy, summed."""
    n = next(iter(batch.values())).shape[0]
    per_example = [
        session.gradient({k: v[i : i + 1] for k, v in batch.items()}, clip_norm=math.inf) for i in range(n)
    ]
    norms = np.array(
        [math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())) for grads in per_example]
    )
    factors = np.minimum(1.0, clip_norm / (norms + 1e-6))
    total = {
        name: sum(f * grads[name].astype(np.float64) for f, grads in zip(factors, per_example, strict=True))
        for name in per_example[0]
    }
    return {k: np.asarray(v) for k, v in total.items()}, norms


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    scale = max(float(np.max(np.abs(w))) for w in want.values())
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope="module")
def encoder_artifacts(tmp_path_factory: pytest.TempPathFactory) -> TrainingArtifacts:
    model = build_reference_encoder(d_model=32, heads=2, ffn=64, seq_len=4, num_classes=5)
    config = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=4, alpha=8.0)
    return build_artifacts(model, config, cache_dir=tmp_path_factory.mktemp("artifacts"))


def _encoder_batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 4, 32)).astype(np.float32) * 2.0,
        "labels": rng.integers(0, 5, n).astype(np.int64),
    }


def test_encoder_clipped_sum_equals_batch_of_one_reference(encoder_artifacts: TrainingArtifacts) -> None:
    session = _Session(encoder_artifacts, seed=1)
    batch = _encoder_batch(6, seed=2)
    _, norms = _reference_clipped_sum(session, batch, math.inf)
    # Half of the examples are clipped, half are not.
    clip_norm = float(np.median(norms))
    want, _ = _reference_clipped_sum(session, batch, clip_norm)
    _assert_close(session.gradient(batch, clip_norm=clip_norm), want)


def test_encoder_unclipped_sum_equals_sum_of_per_example_gradients(encoder_artifacts: TrainingArtifacts) -> None:
    session = _Session(encoder_artifacts, seed=3)
    batch = _encoder_batch(5, seed=4)
    want, norms = _reference_clipped_sum(session, batch, math.inf)
    assert np.all(norms > 0)
    _assert_close(session.gradient(batch, clip_norm=math.inf), want)


def test_tiny_clip_norm_bounds_every_example(encoder_artifacts: TrainingArtifacts) -> None:
    session = _Session(encoder_artifacts, seed=5)
    batch = _encoder_batch(4, seed=6)
    grads = session.gradient(batch, clip_norm=1e-3)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert total <= 4 * 1e-3 * (1 + 1e-4)


def test_noise_input_is_added_to_each_parameter_slice(encoder_artifacts: TrainingArtifacts) -> None:
    session = _Session(encoder_artifacts, seed=7)
    batch = _encoder_batch(3, seed=8)
    noise = np.random.default_rng(9).standard_normal(encoder_artifacts.noise_size).astype(np.float32)
    scale = 0.25
    clean = session.gradient(batch, clip_norm=0.5, scale=scale)
    noisy = session.gradient(batch, clip_norm=0.5, noise=noise, scale=scale)
    offset = 0
    for name, shape in encoder_artifacts.trainable:
        size = int(np.prod(shape))
        expected = noise[offset : offset + size].reshape(shape) * scale
        np.testing.assert_allclose(noisy[name] - clean[name], expected, atol=1e-5, err_msg=name)
        offset += size
    assert offset == noise.size


def _mlp_model() -> onnx.ModelProto:
    """2-D input through a transposed Gemm with alpha != 1, Relu and a MatMul."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((12, 6)).astype(np.float32), "fc1.weight"),  # [out, in]
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(rng.standard_normal((12, 3)).astype(np.float32), "fc2.weight"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1, alpha=0.5),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_gemm_and_2d_inputs_match_batch_of_one_reference(tmp_path: Path) -> None:
    config = ArtifactConfig(targets=("fc*.weight",), rank=2, alpha=2.0, loss="mse")
    artifacts = build_artifacts(_mlp_model(), config, cache_dir=tmp_path)
    session = _Session(artifacts, seed=11)
    rng = np.random.default_rng(12)
    batch = {
        "x": rng.standard_normal((5, 6)).astype(np.float32),
        "target": rng.standard_normal((5, 3)).astype(np.float32),
    }
    _, norms = _reference_clipped_sum(session, batch, math.inf)
    clip_norm = float(np.median(norms))
    want, _ = _reference_clipped_sum(session, batch, clip_norm)
    _assert_close(session.gradient(batch, clip_norm=clip_norm), want)


def test_non_finite_example_counts_as_zero_instead_of_poisoning_the_sum(tmp_path: Path) -> None:
    # A finite but huge input makes this example's gradient inf: before the in-graph
    # drop, its clip factor was C/inf = 0 and 0·inf = NaN spread to every parameter.
    config = ArtifactConfig(targets=("fc*.weight",), rank=2, alpha=2.0, loss="mse")
    artifacts = build_artifacts(_mlp_model(), config, cache_dir=tmp_path)
    session = _Session(artifacts, seed=13)
    rng = np.random.default_rng(14)
    batch = {
        "x": rng.standard_normal((4, 6)).astype(np.float32),
        "target": rng.standard_normal((4, 3)).astype(np.float32),
    }
    poisoned = {k: v.copy() for k, v in batch.items()}
    poisoned["x"][2] = 3e38
    clean = {k: np.delete(v, 2, axis=0) for k, v in batch.items()}
    got = session.gradient(poisoned, clip_norm=1.0)
    assert all(np.all(np.isfinite(g)) for g in got.values())
    _assert_close(got, session.gradient(clean, clip_norm=1.0))
    nan_target = {k: v.copy() for k, v in batch.items()}
    nan_target["target"][0] = np.nan
    _assert_close(session.gradient(nan_target, clip_norm=1.0),
                  session.gradient({k: v[1:] for k, v in batch.items()}, clip_norm=1.0))
