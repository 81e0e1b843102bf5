"""DP training artifacts on graphs from real exporters (tests/data/exported/).

Exported graphs differ from lorad's reference encoder where ORT's gradient builder is
picky: one-output LayerNormalization, initializers shared through Identity nodes, fused
Gelu at opset 20, int64 attention masks, Gather over frozen embeddings, dynamic batch and
sequence dimensions. On each export the private graph's clipped gradient sum must equal
the batch-of-one reference of tests/unit/test_per_example_clipping.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from lorad.trainer.artifacts import ArtifactConfig, build_artifacts
from tests.unit.test_per_example_clipping import _assert_close, _reference_clipped_sum, _Session

DATA = Path(__file__).resolve().parents[1] / "data" / "exported"
CASES = {
    "encoder_torchscript_17": ("q_proj", "v_proj", "up", "head"),
    "encoder_torchscript_20": ("q_proj", "v_proj", "up"),
    "encoder_dynamo_17": ("q_proj", "v_proj", "up"),
    "encoder_dynamo_20": ("q_proj", "v_proj", "up", "head"),
    "conv1d_torchscript_17": ("c_attn",),
    "bert_optimum_17": ("query", "value", "classifier"),
}

# The ORT training-API backend: these run in .venv-ort-training (the README's test command).
pytestmark = pytest.mark.ort_training


def _batch(model: onnx.ModelProto, n: int, seed: int, classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = 6
    mask = np.ones((n, seq), np.int64)
    for i in range(n):
        mask[i, rng.integers(2, seq + 1):] = 0  # padded examples of different lengths
    batch = {"input_ids": rng.integers(0, 64, (n, seq)).astype(np.int64), "attention_mask": mask}
    if any(i.name == "token_type_ids" for i in model.graph.input):
        batch["token_type_ids"] = np.zeros((n, seq), np.int64)
    batch["labels"] = rng.integers(0, classes, n).astype(np.int64)
    return batch


@pytest.mark.parametrize("name", sorted(CASES))
def test_private_gradient_on_exported_graph_equals_batch_of_one_reference(tmp_path: Path, name: str) -> None:
    model = onnx.load(str(DATA / f"{name}.onnx"))
    artifacts = build_artifacts(model, ArtifactConfig(targets=CASES[name], rank=2, alpha=4.0), cache_dir=tmp_path)
    assert artifacts.input_shapes[0] == (None, None)  # batch and sequence stay dynamic
    session = _Session(artifacts, seed=1)
    classes = 3 if name.startswith("bert") else 4
    batch = _batch(model, 5, seed=2, classes=classes)
    _, norms = _reference_clipped_sum(session, batch, math.inf)
    assert np.all(norms > 0)
    clip_norm = float(np.median(norms))  # some examples clipped, some not
    want, _ = _reference_clipped_sum(session, batch, clip_norm)
    _assert_close(session.gradient(batch, clip_norm=clip_norm), want)


def test_op_without_ort_gradient_is_named_not_a_raw_assertion(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "fc.weight")
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="/fc/MatMul"),
             helper.make_node("Atan", ["h"], ["y"], name="/act/Atan")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(ValueError) as e:
        build_artifacts(model, ArtifactConfig(targets=("fc",), rank=1, alpha=1.0, loss="mse"), cache_dir=tmp_path)
    message = str(e.value)
    assert "op Atan (node '/act/Atan') has no gradient" in message and "LayerNormalization" in message
    assert "onnxruntime_src" not in message and ".cc:" not in message


def test_trained_version_of_an_exported_model_survives_a_restart(tmp_path: Path) -> None:
    """The trainer's output on a graph with anonymous weights uses PEFT names and reads back."""
    from safetensors.numpy import load as load_safetensors

    from lorad.adapters.engine import InferenceEngine
    from lorad.adapters.peft_format import WEIGHTS_FILE
    from lorad.adapters.registry import AdapterRegistry
    from lorad.adapters.service import AdapterService
    from lorad.trainer.run import TrainingRun
    from tests.unit.trainer_helpers import make_env, run_config

    def service() -> AdapterService:
        engine = InferenceEngine(DATA / "encoder_dynamo_17.onnx", targets=["q_proj", "v_proj"], rank=4)
        return AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24)

    first = service()
    env = make_env(tmp_path, first)
    batch = _batch(onnx.load(str(DATA / "encoder_dynamo_17.onnx")), 40, seed=3, classes=4)
    for i in range(40):
        env.store.add("alice", {k: batch[k][i] for k in ("input_ids", "attention_mask")}, batch["labels"][i])
    run = TrainingRun(env, "alice", run_config(steps=6, validation_margin=-100.0))
    run.begin()
    result = run.execute()
    env.ledger.close()
    env.store.close()
    assert (result.status, result.version) == ("accepted", 1)
    stored = load_safetensors(first.registry.read_file("alice", 1, WEIGHTS_FILE))
    assert "base_model.model.layers.0.attn.q_proj.lora_A.weight" in stored  # not val_5
    probe = {k: batch[k][:3] for k in ("input_ids", "attention_mask")}
    before = first.infer(probe, "alice").outputs["logits"]
    after = service().infer(probe, "alice")  # a restart: the files are read back
    assert after.version == 1
    np.testing.assert_allclose(after.outputs["logits"], before, atol=1e-6)
