"""adapters.merged: the adapter that dominates the recent requests is served by a session
with its product folded into the target weights, and answers as the LoRA session does;
a new version is served by the LoRA session at once; models whose targets cannot be
merged exactly keep the LoRA session. Real ONNX Runtime sessions, no timing."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_graph import find_targets
from lorad.adapters.merged import WINDOW, merge_blocker
from tests.unit.lora_models import random_adapter, serving_cases

BUDGET = 64 << 20


@pytest.mark.parametrize("case", ["tiny", "demo", "encoder"])
def test_the_dominant_adapter_is_merged_and_answers_as_its_lora_path(case: str) -> None:
    model, patterns, feeds = serving_cases()[case]
    engine = InferenceEngine(model, targets=patterns, rank=4, merged_bytes=BUDGET)
    assert engine.merged is not None
    v1 = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=3, seed=1), name="a", version=1)
    other = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=4, seed=2), name="b", version=1)
    lora = engine.run(feeds, v1)  # before any merge: the LoRA session
    base = engine.run(feeds, None)
    assert max(float(np.abs(lora[k] - base[k]).max()) for k in lora) > 1e-3  # the adapter moves the answer
    for i in range(WINDOW):  # a dominates; b's few requests do not stop that
        engine.run(feeds, other if i % 4 == 0 else v1)
    engine.merged.wait()
    assert engine.merged.merged == ("a", 1)
    merged = engine.run(feeds, v1)
    for k in lora:
        np.testing.assert_allclose(merged[k], lora[k], rtol=1e-5, atol=1e-5)
    # b still runs with its own adapter on the LoRA session; the base model on the base session
    for k, want in engine.run(feeds, None).items():
        np.testing.assert_array_equal(want, base[k])
    assert not np.allclose(engine.run(feeds, other)[next(iter(lora))], merged[next(iter(lora))])

    # A new version is another prepared adapter: served by the LoRA session from its first request.
    v2 = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=4, seed=3), name="a", version=2)
    fresh = engine.run(feeds, v2)
    assert engine.merged.merged == ("a", 1)  # still version 1's, which v2 does not run on
    assert not np.allclose(fresh[next(iter(lora))], merged[next(iter(lora))])
    # When version 1 leaves (no cache entry, no request holds it), its merged session goes.
    del v1, merged
    gc.collect()
    engine.run(feeds, v2)
    assert engine.merged.merged is None


def test_models_whose_targets_cannot_be_merged_exactly_keep_the_lora_session() -> None:
    model, patterns, _ = serving_cases()["demo"]
    targets = find_targets(model, patterns)
    assert merge_blocker(model, targets) is None
    # A tied table: a Gather reads a target weight too (its rows would change with the merge).
    tied = onnx.ModelProto()
    tied.CopyFrom(model)
    weight = targets[0].weight
    tied.graph.node.append(onnx.helper.make_node("Gather", [weight, "pixels"], ["unused"], name="tied"))
    assert "also read by Gather node 'tied'" in (merge_blocker(tied, targets) or "")
    # Over the budget, or 0: no merged path.
    assert InferenceEngine(model, targets=patterns, rank=4, merged_bytes=16).merged is None
    assert InferenceEngine(model, targets=patterns, rank=4).merged is None


def test_a_square_weight_read_through_a_transpose_is_merged_in_its_stored_orientation() -> None:
    """TorchScript at opset 20 reads W [out, in] through a Transpose; q/k/v are square, so
    the orientation must come from the graph, not from the shapes."""
    from tests.model_matrix import EXPORTED

    model = onnx.load(str(EXPORTED / "encoder_torchscript_20.onnx"))
    assert any(n.op_type == "Transpose" for n in model.graph.node)
    ref = np.load(EXPORTED / "reference.npz")
    feeds = {n: ref[f"encoder.{n}"].astype(np.int64) for n in ("input_ids", "attention_mask")}
    engine = InferenceEngine(model, targets=["q_proj", "v_proj", "up", "head"], rank=4, merged_bytes=BUDGET)
    square = [t for t in engine.targets if t.in_features == t.out_features]
    assert square and engine.merged is not None
    prepared = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=4, seed=5), name="a", version=1)
    lora = engine.run(feeds, prepared)
    for _ in range(WINDOW):
        engine.run(feeds, prepared)
    engine.merged.wait()
    assert engine.merged.merged == ("a", 1)
    for k, want in lora.items():
        np.testing.assert_allclose(engine.run(feeds, prepared)[k], want, rtol=1e-5, atol=1e-5)
