"""``lorad quantize-model``: ONNX Runtime's quantiser, with module paths, metadata and
trainability kept (adapters/quantize.py).

Serving, mixed batches, composition, DP training and OTA on quantised bases are rows of the
model matrix (tests/model_matrix.py quantises every model there to int8 and int4); here:
what the file keeps, what is refused, the gradient through ONNX Runtime's quantised
weights against finite differences of the dequantised graph, and why int8 is per row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.module_paths import ModulePaths
from lorad.adapters.quantize import (
    BLOCK_SIZES,
    DEFAULT_BLOCK,
    QUANTIZATION_KEY,
    WEIGHT_TYPES,
    quantization_of,
    quantize_model,
)
from lorad.daemon.cli import build_parser
from lorad.daemon.cli import main as lorad_main
from lorad.daemon.demo import demo_model_path
from lorad.trainer.autodiff import Emitter, backward, graph_constants, infer_tensor_infos
from tests.model_matrix import dequantised_by_ort

EXPORTED = Path(__file__).resolve().parents[1] / "data" / "exported"
FP32_MODELS = [demo_model_path(), *sorted(EXPORTED.glob("*.onnx"))]


@pytest.mark.parametrize("weights", sorted(WEIGHT_TYPES))
@pytest.mark.parametrize("path", FP32_MODELS, ids=lambda p: p.stem)
def test_every_weight_keeps_its_module_path_and_is_quantised(path: Path, weights: str) -> None:
    fp32 = onnx.load(str(path))
    quantised = quantize_model(fp32, weights)
    before = {w.module: (w.in_features, w.out_features) for w in ModulePaths.from_model(fp32).weights}
    after = {w.module: (w.in_features, w.out_features) for w in ModulePaths.from_model(quantised).weights}
    assert after == before
    linears = [q for q in quantization_of(quantised) if q.op not in ("Gather", "GatherBlockQuantized")]
    assert linears and {q.dtype for q in linears} == {weights}, linears
    onnx.checker.check_model(quantised)


def test_int4_quantises_embedding_tables_and_keeps_the_models_metadata() -> None:
    fp32 = onnx.load(str(EXPORTED / "bert_optimum_17.onnx"))
    fp32.metadata_props.add(key="lorad.labels", value='["a", "b"]')
    quantised = quantize_model(fp32, "int4", block=64)
    meta = {p.key: p.value for p in quantised.metadata_props}
    assert meta["lorad.labels"] == '["a", "b"]'
    record = json.loads(meta[QUANTIZATION_KEY])
    assert (record["weights"], record["block"], record["embeddings"]) == ("int4", 64, True)
    tables = [q for q in quantization_of(quantised) if q.op == "GatherBlockQuantized"]
    assert tables and all(q.dtype == "int4" for q in tables)
    kept = quantize_model(fp32, "int4", embeddings=False)
    assert {q.op for q in quantization_of(kept) if q.op.startswith("Gather")} == {"Gather"}


def test_refusals_name_what_is_allowed() -> None:
    fp32 = onnx.load(str(demo_model_path()))
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_model(fp32, "int2")
    with pytest.raises(ValueError, match="32, 64, 128"):
        quantize_model(fp32, "int8", block=16)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(quantize_model(fp32, "int8"), "int4")
    add = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_model(add, "int4")


def test_the_cli_offers_exactly_the_quantisers_choices() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    quant = sub.choices["quantize-model"]  # type: ignore[index]
    options = {a.dest: a.choices for a in quant._actions}
    assert list(options["weights"]) == list(WEIGHT_TYPES)
    assert list(options["block"]) == list(BLOCK_SIZES)


def test_cli_writes_the_model_and_inspect_reports_its_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    assert lorad_main(["quantize-model", str(EXPORTED / "encoder_dynamo_20.onnx"), str(out), "--weights", "int4"]) == 0
    assert "int4" in capsys.readouterr().out
    assert lorad_main(["inspect-model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(r["dtype"], r["block"]) for r in report["weights"]} == {("int4", DEFAULT_BLOCK["int4"])}
    assert all(r["bytes"] > 0 for r in report["weights"])
    assert report["quantization"]["weights"] == "int4"
    assert lorad_main(["quantize-model", str(out), str(tmp_path / "again.onnx"), "--weights", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err


# ---------------------------------------------------------------- the gradient


def _quantised_linear(k: int, n: int, bits: int, block: int) -> onnx.ModelProto:
    """y = (x·W)·c, W [k, n] random, quantised by ONNX Runtime's quantiser (asymmetric: uint8
    zero points packed like the codes; K padded to whole blocks when k is not a multiple)."""
    rng = np.random.default_rng(k * 100 + bits)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "lin.weight"], ["h"], name="/lin/MatMul"), helper.make_node("Mul", ["h", "c"], ["y"])],
        "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])],
        [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "lin.weight"),
         numpy_helper.from_array(rng.normal(size=(n,)).astype(np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return quantize_model(model, "int8" if bits == 8 else "int4", block=block)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "block"), [(64, 32), (48, 32), (96, 64), (40, 128)])
def test_gradient_through_ort_quantised_weights_matches_finite_differences_of_the_dequantised_graph(
        bits: int, k: int, block: int) -> None:
    n = 5
    model = _quantised_linear(k, n, bits, block)
    # W as ONNX Runtime's own kernel (fp32 compute) multiplies by it: x = I.
    nbits = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    w = dequantised_by_ort(model, nbits, np.eye(k, dtype=np.float32)).astype(np.float64)
    c = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "c")).astype(np.float64)
    rng = np.random.default_rng(bits + k)
    x, seed = rng.normal(size=(2, 3, k)), rng.normal(size=(2, 3, n))

    def loss(v: np.ndarray) -> float:  # the dequantised graph, in float64
        return float(np.sum((v @ w) * c * seed))

    e = Emitter("grad", 17, infer_tensor_infos(model), graph_constants(model.graph))
    grads = backward(model.graph, e, {"y": "seed.y"}, ["x"], differentiate_sources=True)
    graph = helper.make_graph([*model.graph.node, *e.nodes, helper.make_node("Identity", [grads["x"]], ["grad.x"])], "g",
                              [*model.graph.input, helper.make_tensor_value_info("seed.y", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("grad.x", TensorProto.FLOAT, None)],
                              [*model.graph.initializer, *e.initializers])
    grad_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    grad_model.ir_version = 9
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["grad.x"], {"x": x.astype(np.float32), "seed.y": seed.astype(np.float32)})[0]
    directions = [rng.normal(size=x.shape) for _ in range(3)]
    want = [(loss(x + 1e-6 * d) - loss(x - 1e-6 * d)) / 2e-6 for d in directions]
    np.testing.assert_allclose([np.sum(got * d) for d in directions], want, rtol=1e-4)


# ---------------------------------------------------------------- int8 compute is per row


def test_int8_compute_answers_each_row_as_alone() -> None:
    """``quantized_compute: int8`` quantises activations per row and block, so a request's
    answer does not depend on the others in its batch (ONNX Runtime's quantize_dynamic, one
    scale per tensor, would make it so: see adapters/quantize.py)."""
    quantised = quantize_model(onnx.load(str(EXPORTED / "bert_optimum_17.onnx")), "int4")
    engine = InferenceEngine(quantised, targets=["query", "value"], rank=4, quantized_compute="int8")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 90, (6, 16)).astype(np.int64),
             "attention_mask": np.ones((6, 16), np.int64), "token_type_ids": np.zeros((6, 16), np.int64)}
    batched = engine.run(feeds)["logits"]
    alone = np.concatenate([engine.run({k: v[i:i + 1] for k, v in feeds.items()})["logits"] for i in range(6)])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)


def test_an_adapter_lorad_made_for_the_fp32_base_is_refused_naming_the_way_out(tmp_path: Path) -> None:
    from lorad.adapters.errors import BaseModelMismatchError
    from lorad.adapters.peft_format import load_peft, read_peft_dir, without_base_record
    from lorad.daemon.demo import DEMO_TARGETS, demo_adapter_dirs

    quantised = quantize_model(onnx.load(str(demo_model_path())), "int4")
    engine = InferenceEngine(quantised, targets=list(DEMO_TARGETS), rank=8)
    files = read_peft_dir(demo_adapter_dirs()["mirror"])
    adapter = load_peft(files, weight_of=engine.module_paths.weight_of)
    assert adapter.base_fingerprint  # lorad recorded the fp32 demo model in it
    with pytest.raises(BaseModelMismatchError, match=r"quantised.*Train again on this base"):
        engine.check(adapter)
    # The way out the message names: the same tensors as plain PEFT files.
    plain = load_peft(without_base_record(files), weight_of=engine.module_paths.weight_of)
    assert not plain.base_fingerprint
    engine.check(plain)
