import numpy as np
import onnxruntime as ort
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_graph import find_targets, fingerprint, lora_input_names, make_inference_graph
from tests.unit.lora_models import random_adapter, tiny_model, tiny_reference


def test_find_targets_reads_shapes_of_matmul_and_transposed_gemm() -> None:
    model, _ = tiny_model()
    targets = {t.weight: t for t in find_targets(model, ["fc*.weight"])}
    assert set(targets) == {"fc1.weight", "fc2.weight"}
    assert (targets["fc1.weight"].in_features, targets["fc1.weight"].out_features) == (6, 5)
    fc2 = targets["fc2.weight"]
    assert (fc2.op, fc2.transposed, fc2.in_features, fc2.out_features, fc2.gemm_alpha) == ("Gemm", True, 5, 4, 0.5)


def test_pattern_matching_nothing_names_the_pattern_and_the_candidates() -> None:
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=r"'attn\.\*'.*fc1, fc2"):
        find_targets(model, ["fc1.weight", "attn.*"])


def test_fingerprint_depends_on_weight_values() -> None:
    a, _ = tiny_model(seed=0)
    b, _ = tiny_model(seed=0)
    c, _ = tiny_model(seed=5)
    ta = find_targets(a, ["fc*"])
    assert fingerprint(a, ta) == fingerprint(b, find_targets(b, ["fc*"]))
    assert fingerprint(a, ta) != fingerprint(c, find_targets(c, ["fc*"]))


def test_inference_graph_declares_lora_inputs_at_slot_rank() -> None:
    model, _ = tiny_model()
    targets = find_targets(model, ["fc*"])
    graph = make_inference_graph(model, targets, rank=8)
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    a, b = lora_input_names("fc2.weight")
    assert inputs[a] == [5, 8] and inputs[b] == [8, 4]
    assert graph.ir_version <= 9


@pytest.mark.parametrize("adapter_rank", [8, 3, 1])
def test_outputs_equal_numpy_reference_including_padded_ranks(adapter_rank: int) -> None:
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=8)
    for seed in range(3):
        adapter = random_adapter(engine.targets, engine.fingerprint, rank=adapter_rank, seed=seed)
        prepared = engine.prepare(adapter, name="a", version=1)
        x = np.random.default_rng(seed + 10).normal(size=(2, 3, 6)).astype(np.float32)
        got = engine.run({"x": x}, prepared)["y"]
        np.testing.assert_allclose(got, tiny_reference(w, x, adapter), rtol=1e-5, atol=1e-5)


def test_adapter_on_a_subset_of_targets_leaves_the_others_alone() -> None:
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4)
    full = random_adapter(engine.targets, engine.fingerprint, rank=2)
    only_fc2 = type(full)(rank=2, alpha=full.alpha, base_fingerprint=full.base_fingerprint, weights={"fc2.weight": full.weights["fc2.weight"]})
    x = np.random.default_rng(3).normal(size=(1, 3, 6)).astype(np.float32)
    got = engine.run({"x": x}, engine.prepare(only_fc2, name="a", version=1))["y"]
    np.testing.assert_allclose(got, tiny_reference(w, x, only_fc2), rtol=1e-5, atol=1e-5)


def test_no_adapter_gives_exactly_the_base_model() -> None:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=8)
    base = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(4, 3, 6)).astype(np.float32)
    np.testing.assert_array_equal(engine.run({"x": x}, None)["y"], base.run(None, {"x": x})[0])
