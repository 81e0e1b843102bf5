"""The portable training backend: lorad's step graph in a plain onnxruntime InferenceSession.

Per-example clipping is checked against a batch-of-one reference computed by the
backend's own non-private graph (each example alone, its gradient sum is its gradient),
the update rules against numpy, and the graph against the ort-training backend in
test_portable_vs_ort_training.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.adapters.engine import InferenceEngine
from lorad.trainer.artifacts import ArtifactConfig, TrainingArtifacts, build_artifacts
from lorad.trainer.autodiff import UnsupportedNodeError
from lorad.trainer.backends import available_backends, open_stepper, resolve_backend
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.portable import PortableStepper

from .trainer_helpers import CLASSES, SEQ, D, tiny_model

RANK = 4


class _FixedNoise:
    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def gaussian64(self, n: int, std: float) -> np.ndarray:
        assert n == self.vector.size
        return self.vector


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("portable-artifacts")


def _artifacts(cache: Path, **changes: Any) -> TrainingArtifacts:
    config = ArtifactConfig(**{"targets": tuple(REFERENCE_TARGETS), "rank": RANK, "alpha": 8.0, **changes})
    return build_artifacts(tiny_model(), config, cache_dir=cache, backend="portable")


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, SEQ, D)).astype(np.float32),
            "labels": rng.integers(0, CLASSES, n).astype(np.int64)}


def _trained_a_bit(stepper: PortableStepper) -> PortableStepper:
    """B starts at zero; a few steps make every LoRA factor matter."""
    for k in range(3):
        stepper.step(_batch(8, seed=100 + k))
    return stepper


def _per_example_gradients(cache: Path, params: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    plain = PortableStepper(_artifacts(cache, private=False, optimizer="sgd"), learning_rate=1.0, dp=None, noise=None,
                            expected_batch_size=1.0)
    plain._params = params  # the same parameters as the private stepper under test
    rows = []
    for k in range(len(batch["labels"])):
        one = {name: value[k: k + 1] for name, value in batch.items()}
        rows.append(plain.gradient(one, clip_norm=math.inf)[0])
    return np.stack(rows).astype(np.float64)


def test_clipped_sum_equals_batch_of_one_reference(cache: Path) -> None:
    stepper = _trained_a_bit(PortableStepper(_artifacts(cache, optimizer="sgd"), learning_rate=0.5,
                                             dp=DPSettings(noise_multiplier=0.0, clip_norm=1e9, expected_batch_size=8),
                                             noise=_FixedNoise(np.zeros(0))))
    batch = _batch(6, seed=1)
    per_example = _per_example_gradients(cache, stepper._params, batch)
    norms = np.linalg.norm(per_example, axis=1)
    clip = float(np.median(norms))  # half the examples are clipped
    factors = np.minimum(1.0, clip / (norms + 1e-6))
    want = (factors[:, None] * per_example).sum(axis=0)
    got, _ = stepper.gradient(batch, clip_norm=clip)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6 * np.abs(want).max())
    unclipped, _ = stepper.gradient(batch, clip_norm=1e9)
    np.testing.assert_allclose(unclipped, per_example.sum(axis=0), rtol=2e-4, atol=2e-6 * np.abs(want).max())


def test_noise_is_added_once_in_float64_then_scaled(cache: Path) -> None:
    stepper = _trained_a_bit(PortableStepper(_artifacts(cache, optimizer="sgd"), learning_rate=0.5,
                                             dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=8),
                                             noise=_FixedNoise(np.zeros(0))))
    batch = _batch(4, seed=2)
    noise = np.random.default_rng(3).normal(size=stepper._artifacts.noise_size) * 0.1
    clean, _ = stepper.gradient(batch, clip_norm=1.0)
    noised, _ = stepper.gradient(batch, clip_norm=1.0, noise=noise, grad_scale=0.25)
    want = ((clean.astype(np.float64) + noise).astype(np.float32) * np.float32(0.25))
    np.testing.assert_array_equal(noised, want)


def test_non_finite_example_counts_as_zero(cache: Path) -> None:
    stepper = _trained_a_bit(PortableStepper(_artifacts(cache, optimizer="sgd"), learning_rate=0.5,
                                             dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=8),
                                             noise=_FixedNoise(np.zeros(0))))
    batch = _batch(5, seed=4)
    without, _ = stepper.gradient({k: v[1:] for k, v in batch.items()}, clip_norm=1.0)
    poisoned = {k: v.copy() for k, v in batch.items()}
    poisoned["x"][0] = 3e38  # finite input, non-finite gradient
    got, _ = stepper.gradient(poisoned, clip_norm=1.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, without, rtol=1e-5, atol=1e-7)


def test_sgd_and_adamw_updates_follow_their_formulas(cache: Path) -> None:
    batch = _batch(8, seed=5)
    dp = DPSettings(noise_multiplier=0.0, clip_norm=0.7, expected_batch_size=8)
    sgd = PortableStepper(_artifacts(cache, optimizer="sgd"), learning_rate=0.3, dp=dp, noise=_FixedNoise(np.zeros(0)))
    p0 = sgd._params.copy()
    g, _ = sgd.gradient(batch, clip_norm=0.7, grad_scale=1 / 8)
    sgd.step(batch)
    np.testing.assert_allclose(sgd._params, p0 - np.float32(0.3) * g, rtol=1e-6, atol=1e-7)

    adamw = PortableStepper(_artifacts(cache, weight_decay=0.1), learning_rate=0.01, dp=dp,
                            noise=_FixedNoise(np.zeros(0)))
    p, m, v = adamw._params.astype(np.float64), np.zeros_like(adamw._params, np.float64), 0.0
    for t in (1, 2):
        g = adamw.gradient(batch, clip_norm=0.7, grad_scale=1 / 8)[0].astype(np.float64)
        adamw.step(batch)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - 0.01 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-6)
        p = p - 0.01 * 0.1 * p
        np.testing.assert_allclose(adamw._params, p, rtol=1e-5, atol=1e-6)


def test_each_step_gets_fresh_noise_in_the_source_order(cache: Path) -> None:
    from lorad.trainer.noise import SeededNoise

    artifacts = _artifacts(cache, optimizer="sgd")
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4)
    stepper = PortableStepper(artifacts, learning_rate=1.0, dp=dp, noise=SeededNoise(5))
    reference = SeededNoise(5)
    empty = {"x": np.zeros((0, SEQ, D), np.float32), "labels": np.zeros(0, np.int64)}
    for _ in range(3):  # an empty batch's update is exactly the scaled noise
        before = stepper._params.copy()
        stepper.step(empty)
        want = reference.gaussian64(artifacts.noise_size, 1.0).astype(np.float32) / 4
        np.testing.assert_allclose(before - stepper._params, want, rtol=1e-6, atol=1e-7)
    stepper.close()
    stepper.close()


def test_empty_batch_update_is_the_scaled_noise_alone(cache: Path) -> None:
    artifacts = _artifacts(cache, optimizer="sgd")
    noise = np.random.default_rng(6).normal(size=artifacts.noise_size)
    stepper = PortableStepper(artifacts, learning_rate=1.0, noise=_FixedNoise(noise),
                              dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4))
    before = stepper._params.copy()
    result = stepper.step({"x": np.zeros((0, SEQ, D), np.float32), "labels": np.zeros(0, np.int64)})
    assert result.batch_size == 0 and result.step == 1 and stepper.steps == 1
    np.testing.assert_allclose(before - stepper._params, noise.astype(np.float32) / 4, rtol=1e-6, atol=1e-7)


def test_frozen_a_stays_and_checkpoint_resumes_identically(cache: Path, tmp_path: Path) -> None:
    artifacts = _artifacts(cache, freeze_a=True)
    dp = DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=8)
    from lorad.trainer.noise import SeededNoise

    first = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(1))
    a_before = {k: v for k, v in first.parameters().items() if k.endswith(".A")}
    first.step(_batch(8, seed=7))
    first.save_checkpoint(tmp_path / "checkpoint")
    resumed = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(2),
                              resume_from=tmp_path / "checkpoint")
    assert resumed.steps == 1
    for k in range(2):
        first.step(_batch(8, seed=8 + k))
        resumed.step(_batch(8, seed=8 + k))
    for name, value in first.parameters().items():
        np.testing.assert_array_equal(value, resumed.parameters()[name])
    for name, value in a_before.items():
        np.testing.assert_array_equal(value, first.parameters()[name])
    (tmp_path / "bad").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot read the training checkpoint"):
        PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(2), resume_from=tmp_path / "bad")


def test_exported_adapter_serves_the_trained_function(cache: Path) -> None:
    stepper = _trained_a_bit(PortableStepper(_artifacts(cache), learning_rate=0.05, noise=_FixedNoise(np.zeros(0)),
                                             dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=8)))
    batch = _batch(5, seed=9)
    engine = InferenceEngine(tiny_model(), targets=REFERENCE_TARGETS, rank=RANK)
    logits = engine.run({"x": batch["x"]}, engine.prepare(stepper.export_adapter(), name="t", version=1))["logits"]
    z = logits.astype(np.float64)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    want = -log_p[np.arange(5), batch["labels"]].sum()
    assert stepper.eval_loss_sum(batch) == pytest.approx(want, rel=1e-4)


def test_an_op_without_a_gradient_rule_is_refused_at_build(tmp_path: Path) -> None:
    """A Cos between two target layers: the LoRA gradient must flow through it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), f"l{i}.weight") for i in (0, 1)]
    nodes = [helper.make_node("MatMul", ["x", "l0.weight"], ["h0"], name="mm0"),
             helper.make_node("Cos", ["h0"], ["c0"], name="the_cos"),
             helper.make_node("MatMul", ["c0", "l1.weight"], ["logits"], name="mm1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(UnsupportedNodeError, match=r"'Cos'.*'the_cos'"):
        build_artifacts(model, ArtifactConfig(targets=("l*.weight",), rank=2, alpha=2.0), cache_dir=tmp_path,
                        backend="portable")
    assert not any(p.is_dir() and not p.name.startswith(".") for p in tmp_path.iterdir())


def test_gemm_mlp_with_2d_inputs_trains(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 8)).astype(np.float32), "fc1.weight"),
             numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "fc1.bias"),
             numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "fc2.weight"),
             numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "fc2.bias")]
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1, alpha=0.5)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    artifacts = build_artifacts(model, ArtifactConfig(targets=("fc*.weight",), rank=2, alpha=2.0), cache_dir=tmp_path,
                                backend="portable")
    stepper = open_stepper(artifacts, learning_rate=0.05, noise=_FixedNoise(np.zeros(artifacts.noise_size)),
                           dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4))
    batch = {"x": rng.normal(size=(16, 6)).astype(np.float32), "labels": rng.integers(0, 3, 16).astype(np.int64)}
    before = stepper.eval_loss_sum(batch)
    for _ in range(30):
        stepper.step(batch)
    assert stepper.eval_loss_sum(batch) < before


def test_backend_choice() -> None:
    reasons = available_backends()
    assert reasons["portable"] is None
    assert resolve_backend("portable") == "portable"
    assert resolve_backend("auto") == "portable"
    with pytest.raises(ValueError, match=r"trainer.backend must be one of"):
        resolve_backend("tensorflow")  # type: ignore[arg-type]
    if reasons["ort-training"] is not None:
        from lorad.trainer.service import TrainingUnavailableError

        with pytest.raises(TrainingUnavailableError, match=r"trainer.backend 'ort-training' cannot run here"):
            resolve_backend("ort-training")



def test_trainer_service_trains_on_plain_onnxruntime_and_never_switches_backend(tmp_path: Path) -> None:
    from lorad.trainer.config import parse_trainer_section
    from lorad.trainer.service import TrainerService

    from .trainer_helpers import make_service

    service = make_service(tmp_path)
    base = {"testing": True, "noise": "seeded", "schedule": False}
    auto = TrainerService(parse_trainer_section(base), adapters=service, state_dir=tmp_path / "a")
    try:
        assert auto.available and auto.status()["backend"] == "portable"
    finally:
        auto.close()
    if available_backends()["ort-training"] is None:
        return  # this runtime has the training APIs: ort-training is available too
    pinned = TrainerService(parse_trainer_section({**base, "backend": "ort-training"}), adapters=service,
                            state_dir=tmp_path / "b")
    try:
        assert not pinned.available
        assert "trainer.backend 'ort-training' cannot run here" in (pinned.unavailable_reason or "")
    finally:
        pinned.close()


def test_ghost_norms_give_the_materialised_clipped_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorad.trainer.portable_graph as portable_graph

    dp = DPSettings(noise_multiplier=0.0, clip_norm=0.3, expected_batch_size=8)
    steppers = {}
    for mode in ("materialize", "ghost"):
        monkeypatch.setattr(portable_graph, "PER_EXAMPLE", mode)
        steppers[mode] = _trained_a_bit(PortableStepper(_artifacts(tmp_path, optimizer="sgd"), learning_rate=0.5,
                                                        dp=dp, noise=_FixedNoise(np.zeros(0))))
    batch = _batch(6, seed=11)
    batch["x"][2] = 3e38  # and the non-finite example counts as zero in both
    want, _ = steppers["materialize"].gradient(batch, clip_norm=0.3)
    got, _ = steppers["ghost"].gradient(batch, clip_norm=0.3)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
