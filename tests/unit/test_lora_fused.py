"""adapters.lora_fused: the fused single-adapter graph computes exactly what the plain
form of adapters.lora_graph computes, with fewer nodes, on the reference encoder (q/k/v
share an input; MatMul + bias Add on 3-D rows), the demo MLP (2-D MatMul + bias Add) and
the tiny model (Gemm with transB and alpha; a flattened input);
an adapter's inputs are one copy of its numbers (MiniLM's fusions: test_minilm.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from lorad.adapters.lora_fused import make_fused_inference_graph
from lorad.adapters.lora_graph import find_targets, lora_input_names, make_inference_graph
from tests.unit.lora_models import serving_cases

RANK = 4


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", ["tiny", "demo", "encoder"])
def test_fused_equals_plain_and_zero_equals_base(case: str) -> None:
    model, patterns, feeds = serving_cases()[case]
    targets = find_targets(model, patterns)
    rng = np.random.default_rng(1)
    matrices = {
        t.weight: ((rng.normal(size=(t.in_features, RANK)) * 0.1).astype(np.float32),
                   (rng.normal(size=(RANK, t.out_features)) * 0.1).astype(np.float32))
        for t in targets
    }
    plain = make_inference_graph(model, targets, rank=RANK)
    fused, layout = make_fused_inference_graph(model, targets, rank=RANK)
    assert len(fused.graph.node) < len(plain.graph.node)
    plain_feeds = dict(feeds)
    for t in targets:
        plain_feeds.update(zip(lora_input_names(t.weight), matrices[t.weight], strict=True))
    for want, got in zip(_session(plain).run(None, plain_feeds), _session(fused).run(None, {**feeds, **layout.place(matrices)[0]}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    zero = _session(fused).run(None, {**feeds, **layout.place({})[0]})
    for want, got in zip(_session(model).run(None, feeds), zero, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_targets_sharing_an_input_share_one_a_product() -> None:
    model = build_reference_encoder()
    _, layout = make_fused_inference_graph(model, find_targets(model, REFERENCE_TARGETS), rank=RANK)
    grouped = sorted(g.weights for g in layout.groups if len(g.weights) > 1)
    assert [sorted(w.rsplit(".", 2)[-2] for w in g) for g in grouped] == [["k_proj", "q_proj", "v_proj"]] * 2


def test_an_adapters_inputs_are_views_of_one_copy() -> None:
    """place(): a smaller-rank adapter is zero-padded; the per-target (A, B) it hands the
    banks are views of the session inputs; absent targets read shared read-only zeros."""
    model = build_reference_encoder()
    targets = find_targets(model, REFERENCE_TARGETS)
    _, layout = make_fused_inference_graph(model, targets, rank=RANK)
    rng = np.random.default_rng(2)
    some = targets[:-1]
    pairs = {t.weight: (rng.normal(size=(t.in_features, 2)).astype(np.float32),
                        rng.normal(size=(2, t.out_features)).astype(np.float32)) for t in some}
    feeds, views = layout.place(pairs)
    inputs = {id(a) for a in feeds.values()}
    for t in some:
        a, b = views[t.weight]
        assert a.shape == (t.in_features, RANK) and b.shape == (RANK, t.out_features)
        np.testing.assert_array_equal(a[:, :2], pairs[t.weight][0])
        assert not a[:, 2:].any() and not b[2:].any()
        assert any(np.shares_memory(a, feeds[g.a_input]) for g in layout.groups if t.weight in g.weights)
        assert id(b) in inputs
    absent = targets[-1].weight
    assert absent not in views
    zero = next(feeds[n] for n, (w, _) in layout.b_inputs.items() if w == absent)
    assert not zero.any() and not zero.flags.writeable
    assert zero is layout.place({})[0][next(n for n, (w, _) in layout.b_inputs.items() if w == absent)]
