"""Training artifacts: only LoRA is trainable, the cache, the DP rewrite and its checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from lorad.adapters.lora_graph import find_targets, lora_input_names
from lorad.trainer._ort_training import load as load_ort_training
from lorad.trainer.artifacts import (
    CLIP_NORM_INPUT,
    GRAD_SCALE_INPUT,
    NOISE_INPUT,
    ArtifactConfig,
    OrtConventionError,
    TrainingArtifacts,
    _clip_noise_scale,
    build_artifacts,
)

# ONNX Runtime's training API: these tests run in .venv-ort-training (see the README).
pytestmark = pytest.mark.ort_training

_CONFIG = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return build_reference_encoder(d_model=32, heads=2, ffn=64, seq_len=4, num_classes=5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifact-cache")


def _checkpoint_params(artifacts: TrainingArtifacts) -> dict[str, bool]:
    state = load_ort_training().api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    return {name: param.requires_grad for name, param in state.parameters}


def test_only_lora_matrices_are_parameters(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = build_artifacts(model, _CONFIG, cache_dir=cache)
    targets = find_targets(model, REFERENCE_TARGETS)
    assert len(targets) == 12
    expected = {name for t in targets for name in lora_input_names(t.weight)}
    assert _checkpoint_params(artifacts) == {name: True for name in expected}
    assert {name for name, _ in artifacts.trainable} == expected
    assert artifacts.noise_size == sum(4 * (t.in_features + t.out_features) for t in targets)
    for path in (artifacts.training_model, artifacts.eval_model, artifacts.optimizer_model):
        m = onnx.load(str(path))
        assert m.ir_version <= 9
        assert {o.domain: o.version for o in m.opset_import}.get("", 17) == 17


def test_frozen_a_trains_b_only(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = build_artifacts(model, dataclasses.replace(_CONFIG, freeze_a=True), cache_dir=cache)
    params = _checkpoint_params(artifacts)
    assert params and all(params[n] == n.endswith(".B") for n in params)
    assert all(name.endswith(".B") for name, _ in artifacts.trainable)
    assert sorted(artifacts.frozen) == sorted(n for n in params if n.endswith(".A"))
    assert artifacts.noise_size == sum(int(np.prod(shape)) for _, shape in artifacts.trainable)


def test_private_graph_replaces_the_gradient_reductions(model: onnx.ModelProto, cache: Path) -> None:
    artifacts = build_artifacts(model, _CONFIG, cache_dir=cache)
    training = onnx.load(str(artifacts.training_model))
    inputs = {i.name for i in training.graph.input}
    assert {CLIP_NORM_INPUT, NOISE_INPUT, GRAD_SCALE_INPUT} <= inputs
    producers = {out: node for node in training.graph.node for out in node.output}
    for name, _ in artifacts.trainable:
        assert producers[f"{name}_grad"].op_type == "Reshape"
        assert producers[f"{name}_grad"].name == f"{name}_grad"
    assert not [n for n in training.graph.node if n.op_type == "ReduceSum" and n.output[0].endswith("_grad")]


def test_cache_reuses_entries_and_keys_on_config(model: onnx.ModelProto, tmp_path: Path) -> None:
    first = build_artifacts(model, _CONFIG, cache_dir=tmp_path)
    stamp = first.training_model.stat().st_mtime_ns
    again = build_artifacts(model, _CONFIG, cache_dir=tmp_path)
    assert again == first
    assert again.training_model.stat().st_mtime_ns == stamp
    other = build_artifacts(model, dataclasses.replace(_CONFIG, rank=2), cache_dir=tmp_path)
    assert other.directory != first.directory
    other_model = build_reference_encoder(d_model=32, heads=2, ffn=64, seq_len=4, num_classes=5, seed=1)
    third = build_artifacts(other_model, _CONFIG, cache_dir=tmp_path)
    assert third.directory not in (first.directory, other.directory)
    # Three finished entries and no staging leftovers.
    assert len(list(tmp_path.iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_changed_gradient_convention_fails_loudly(model: onnx.ModelProto, cache: Path) -> None:
    # A graph whose gradients are not ReduceSums over per-example copies: the plain one.
    plain = build_artifacts(model, dataclasses.replace(_CONFIG, private=False), cache_dir=cache)
    training = onnx.load(str(plain.training_model))
    with pytest.raises(OrtConventionError, match="expected ReduceSum"):
        _clip_noise_scale(training, list(plain.trainable))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="rank"):
        ArtifactConfig(targets=("w",), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="loss"):
        ArtifactConfig(targets=("w",), rank=1, alpha=1.0, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets"):
        ArtifactConfig(targets=(), rank=1, alpha=1.0)


def test_unknown_output_is_refused(model: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model output"):
        build_artifacts(model, dataclasses.replace(_CONFIG, output="nope"), cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("per_example", [False, True])
def test_training_graph_computes_the_served_function(model: onnx.ModelProto, per_example: bool) -> None:
    import onnxruntime

    from lorad.adapters.lora import LoraWeights
    from lorad.adapters.lora_graph import make_inference_graph, make_training_graph

    targets = find_targets(model, REFERENCE_TARGETS)
    rng = np.random.default_rng(0)
    init = {
        t.weight: LoraWeights(
            rng.standard_normal((t.in_features, 3)).astype(np.float32),
            rng.standard_normal((3, t.out_features)).astype(np.float32) * 0.1,
        )
        for t in targets
    }
    names = [n for t in targets for n in lora_input_names(t.weight)] if per_example else []
    training = make_training_graph(model, targets, init=init, scale=0.5, per_example=names)
    assert training.ir_version <= 9
    serving = make_inference_graph(model, targets, rank=3)
    x = rng.standard_normal((3, 4, 32)).astype(np.float32)
    feeds = {"x": x}
    for t in targets:
        a_name, b_name = lora_input_names(t.weight)
        feeds[a_name], feeds[b_name] = init[t.weight].A, init[t.weight].B * 0.5

    def run(m: onnx.ModelProto, f: dict[str, np.ndarray]) -> np.ndarray:
        return onnxruntime.InferenceSession(m.SerializeToString()).run(["logits"], f)[0]

    np.testing.assert_allclose(run(training, {"x": x}), run(serving, feeds), rtol=1e-4, atol=1e-5)
