"""``a_init: principal``: LoRA A from the base weights' top singular vectors (public data).

Checked against a reference SVD of each base weight, in the artifacts the portable
backend writes (so these run on plain onnxruntime), through the cache and a whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.adapters.lora_graph import LoraTarget, lora_input_names
from lorad.trainer.artifacts import ArtifactConfig, TrainingArtifacts, build_artifacts
from lorad.trainer.backends import open_stepper
from lorad.trainer.config import AdapterTrainingConfig, TrainerConfigError, parse_trainer_section
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.noise import SeededNoise
from lorad.trainer.run import TrainingRun

from .trainer_helpers import (
    CLASSES,
    SEQ,
    D,
    fill_store,
    inputs,
    labelled_by,
    make_env,
    make_service,
    run_config,
    teacher,
    tiny_model,
)

RANK = 4
NORM = 0.6  # the principal A's column norm


def _artifacts(model: onnx.ModelProto, cache: Path, **changes: Any) -> TrainingArtifacts:
    config = ArtifactConfig(**{"targets": tuple(REFERENCE_TARGETS), "rank": RANK, "alpha": 8.0, **changes})
    return build_artifacts(model, config, cache_dir=cache, backend="portable")


def _initial(artifacts: TrainingArtifacts) -> dict[str, np.ndarray]:
    """Every LoRA tensor's initial value, by name, as the stepper starts from it."""
    flat = np.load(artifacts.initial_parameters)
    out, offset = {}, 0
    for name, shape in artifacts.trainable:
        size = int(np.prod(shape))
        out[name] = flat[offset: offset + size].reshape(shape)
        offset += size
    assert offset == flat.size
    with np.load(artifacts.directory / "frozen_parameters.npz") as frozen:
        out.update({name: frozen[name] for name in artifacts.frozen})
    return out


def _weight(model: onnx.ModelProto, t: LoraTarget) -> np.ndarray:
    """The target's base weight in the ``x·W`` orientation, [in, out]."""
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == t.weight)).astype(np.float64)
    return w.T if t.transposed else w


def _assert_principal(a: np.ndarray, w: np.ndarray, rank: int) -> None:
    """Columns: ±0.6 × the top singular vectors of ``w`` (then an orthonormal complement)."""
    u = np.linalg.svd(w, full_matrices=False)[0]
    k = min(rank, u.shape[1])
    assert a.shape == (w.shape[0], rank) and a.dtype == np.float32
    np.testing.assert_allclose(a.T.astype(np.float64) @ a, NORM**2 * np.eye(rank), atol=1e-5)
    for j in range(k):  # singular vectors are defined up to sign
        np.testing.assert_allclose(np.abs(u[:, j] @ a[:, j]), NORM, atol=1e-5)
    if k < rank:  # the complement is orthogonal to every left singular vector
        np.testing.assert_allclose(u.T @ a[:, k:], 0.0, atol=1e-5)


def test_principal_a_is_the_scaled_top_singular_vectors_and_b_is_zero(tmp_path: Path) -> None:
    model = tiny_model()
    artifacts = _artifacts(model, tmp_path, a_init="principal")
    init = _initial(artifacts)
    assert len(artifacts.targets) == 12
    for t in artifacts.targets:
        a_name, b_name = lora_input_names(t.weight)
        _assert_principal(init[a_name], _weight(model, t), RANK)
        assert not init[b_name].any() and init[b_name].shape == (RANK, t.out_features)
    # The same columns whatever the seed (the seed only draws a complement, none needed here).
    again = _initial(_artifacts(model, tmp_path, a_init="principal", init_seed=5))
    for name, value in init.items():
        np.testing.assert_array_equal(again[name], value)


def _gemm_model(w_stored: np.ndarray) -> onnx.ModelProto:
    """logits = Gemm(x, W, transB=1): W stored [out, in], as a torch Linear exports."""
    out_features, in_features = w_stored.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight"], ["logits"], name="fc", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_features])],
        initializer=[numpy_helper.from_array(w_stored.astype(np.float32), "fc.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_rank_above_the_weights_rank_continues_with_an_orthonormal_complement(tmp_path: Path) -> None:
    # W is [16 in, 3 out]: 3 singular directions, rank 6 needs 3 more.
    model = _gemm_model(np.random.default_rng(0).normal(size=(3, 16)))
    config = ArtifactConfig(targets=("fc.weight",), rank=6, alpha=6.0, a_init="principal")
    artifacts = build_artifacts(model, config, cache_dir=tmp_path, backend="portable")
    (t,) = artifacts.targets
    assert t.transposed and (t.in_features, t.out_features) == (16, 3)
    _assert_principal(_initial(artifacts)[lora_input_names(t.weight)[0]], _weight(model, t), 6)


def test_rank_above_in_features_is_refused_with_a_hint(tmp_path: Path) -> None:
    model = _gemm_model(np.random.default_rng(0).normal(size=(3, 4)))
    config = ArtifactConfig(targets=("fc.weight",), rank=6, alpha=6.0, a_init="principal")
    with pytest.raises(ValueError, match=r"a_init 'principal' needs rank.*'fc.weight' has 4 inputs.*a_init: random"):
        build_artifacts(model, config, cache_dir=tmp_path, backend="portable")
    # The random A has no such limit.
    build_artifacts(model, ArtifactConfig(targets=("fc.weight",), rank=6, alpha=6.0), cache_dir=tmp_path,
                    backend="portable")


def test_cache_keys_on_a_init(tmp_path: Path) -> None:
    model = tiny_model()
    random_a = _artifacts(model, tmp_path)
    principal = _artifacts(model, tmp_path, a_init="principal")
    assert random_a.config.a_init == "random" and principal.config.a_init == "principal"
    assert principal.directory != random_a.directory
    assert not np.array_equal(np.load(principal.initial_parameters), np.load(random_a.initial_parameters))
    assert _artifacts(model, tmp_path, a_init="principal").directory == principal.directory
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    with pytest.raises(ValueError, match="a_init must be one of"):
        ArtifactConfig(targets=("w",), rank=1, alpha=1.0, a_init="svd")  # type: ignore[arg-type]


def test_frozen_principal_a_stays_while_b_trains(tmp_path: Path) -> None:
    model = tiny_model()
    artifacts = _artifacts(model, tmp_path, a_init="principal", freeze_a=True)
    assert sorted(artifacts.frozen) == sorted(lora_input_names(t.weight)[0] for t in artifacts.targets)
    assert artifacts.noise_size == sum(RANK * t.out_features for t in artifacts.targets)
    init = _initial(artifacts)
    stepper = open_stepper(artifacts, learning_rate=0.05, noise=SeededNoise(0),
                           dp=DPSettings(noise_multiplier=0.1, clip_norm=1.0, expected_batch_size=8))
    rng = np.random.default_rng(1)
    batch: dict[str, np.ndarray] = {"x": rng.normal(size=(8, SEQ, D)).astype(np.float32),
             "labels": rng.integers(0, CLASSES, 8).astype(np.int64)}
    before = stepper.eval_loss_sum(batch)
    for _ in range(20):
        stepper.step(batch)
    assert stepper.eval_loss_sum(batch) < before
    weights = stepper.export_adapter().weights
    for t in artifacts.targets:
        a_name, _ = lora_input_names(t.weight)
        np.testing.assert_array_equal(weights[t.weight].A, init[a_name])
        _assert_principal(weights[t.weight].A, _weight(model, t), RANK)
        assert weights[t.weight].B.any()


def test_trainer_config_key() -> None:
    assert AdapterTrainingConfig().a_init == "random"
    c = parse_trainer_section({"defaults": {"a_init": "principal"}, "adapters": {"alice": {}}})
    assert c.for_adapter("alice").a_init == "principal"
    with pytest.raises(TrainerConfigError) as info:
        parse_trainer_section({"adapters": {"alice": {"a_init": "svd"}}})
    assert info.value.key == "trainer.adapters.alice.a_init" and "principal" in str(info.value)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_a_run_trains_from_the_principal_a(tmp_path: Path, freeze_a: bool) -> None:
    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        x = inputs(60, seed=1)
        fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
        config = run_config(a_init="principal", freeze_a=freeze_a, learning_rate=0.05 if freeze_a else 0.01)
        run = TrainingRun(env, "alice", config)
        run.begin()
        result = run.execute()
        assert (result.status, result.steps_done, result.version) == ("accepted", 12, 1)
        model = tiny_model()
        with service.cache.lease("alice") as lease:
            weights = lease.adapter.weights
        for t in service.engine.targets:
            a = weights[t.weight].A
            if freeze_a:
                _assert_principal(a, _weight(model, t), RANK)
            else:  # trained from it: moved, but still mostly in the principal directions
                u = np.linalg.svd(_weight(model, t), full_matrices=False)[0][:, :RANK]
                assert not np.allclose(a.T @ a, NORM**2 * np.eye(RANK), atol=1e-5)
                assert np.linalg.norm(u.T @ a) > 0.5 * np.linalg.norm(a)
            assert weights[t.weight].B.any()
        (entry,) = [p for p in (env.state_dir / "artifacts").iterdir() if not p.name.startswith(".")]
        assert '"a_init": "principal"' in (entry / "lorad_artifacts.json").read_text()
    finally:
        env.ledger.close()
        env.store.close()
