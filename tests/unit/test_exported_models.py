"""lorad on graphs from real exporters and adapters saved by real PEFT (tests/data/exported/).

The fixtures and the torch reference outputs come from tests/data/make_exported_fixtures.py
(torch, onnxscript, peft, Optimum in a separate virtualenv); nothing here configures a
``weight_names`` mapping: lorad recovers every module path from the graph itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load as load_safetensors

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.errors import InvalidAdapterError
from lorad.adapters.module_paths import ModulePaths
from lorad.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_dir
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService

DATA = Path(__file__).resolve().parents[1] / "data" / "exported"
REF = dict(np.load(DATA / "reference.npz"))
ENCODERS = ["encoder_torchscript_17", "encoder_torchscript_20", "encoder_dynamo_17", "encoder_dynamo_20"]
CASES = [
    *[(m, a) for m in ENCODERS for a in ("peft_encoder_qvu", "peft_encoder_head")],
    ("conv1d_torchscript_17", "peft_conv1d"),  # transformers Conv1D, PEFT fan_in_fan_out=True
    ("bert_optimum_17", "peft_bert"),  # Optimum export of BertForSequenceClassification
]


def _family(model: str) -> str:
    return model.split("_")[0]


def _inputs(model: str) -> dict[str, np.ndarray]:
    # The Conv1D encoder was run on the encoder's inputs.
    family = "encoder" if _family(model) == "conv1d" else _family(model)
    return {k.split(".", 1)[1]: v for k, v in REF.items() if k.startswith(f"{family}.") and v.dtype == np.int64}


def _service(tmp_path: Path, model: str, targets: list[str]) -> AdapterService:
    engine = InferenceEngine(DATA / f"{model}.onnx", targets=targets, rank=8)
    return AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24)


def _target_modules(adapter: str) -> list[str]:
    return list(json.loads((DATA / adapter / CONFIG_FILE).read_text())["target_modules"])


@pytest.mark.parametrize(("model", "adapter"), CASES)
def test_unchanged_peft_adapter_serves_torch_outputs(tmp_path: Path, model: str, adapter: str) -> None:
    # model.targets as a PEFT user writes target_modules; the upload is PEFT's files, unchanged.
    service = _service(tmp_path, model, _target_modules(adapter))
    files = read_peft_dir(DATA / adapter)
    service.upload("user", files)
    inputs = _inputs(model)
    family = _family(model)
    np.testing.assert_allclose(service.infer(inputs).outputs["logits"], REF[f"{family}.base"], atol=1e-4)
    np.testing.assert_allclose(service.infer(inputs, "user").outputs["logits"], REF[f"{family}.{adapter}"], atol=1e-4)

    version, exported = service.export("user")
    assert version == 1 and exported == files  # an upload comes back bit-identical


def test_every_weight_of_every_fixture_has_its_module_path() -> None:
    for model in {m for m, _ in CASES}:
        paths = ModulePaths.from_model(onnx.load(str(DATA / f"{model}.onnx")))
        unrecovered = [w.weight for w in paths.weights if w.module is None]
        assert not unrecovered, (model, unrecovered)
    sources = {
        model: {w.source for w in ModulePaths.from_model(onnx.load(str(DATA / f"{model}.onnx"))).weights}
        for model in ENCODERS
    }
    # each exporter keeps the path somewhere else
    assert sources == {
        "encoder_torchscript_17": {"node_name"},
        "encoder_torchscript_20": {"node_name"},
        "encoder_dynamo_17": {"bias", "initializer"},  # the version converter drops the name scopes
        "encoder_dynamo_20": {"name_scope"},
    }


def test_transpose_before_matmul_is_a_transposed_target() -> None:
    paths = ModulePaths.from_model(onnx.load(str(DATA / "encoder_torchscript_20.onnx")))
    up = paths.by_module["layers.0.up"]
    assert (up.weight, up.op, up.transposed, up.shape, up.in_features, up.out_features) == (
        "layers.0.up.weight", "MatMul", True, (64, 32), 32, 64)


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["q_proj", "v_proj"], {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.v_proj"}),
        (["layers.1.*_proj"], {f"layers.1.attn.{p}_proj" for p in "qkv"} | {"layers.1.attn.out_proj"}),
        (["attn.q_proj", "head"], {"layers.0.attn.q_proj", "layers.1.attn.q_proj", "head"}),
        (["layers.*.attn.*_proj.weight"], {f"layers.{i}.attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "out")}),
        (["onnx::MatMul_237"], {"layers.0.up"}),  # an ONNX weight name still works
    ],
)
def test_targets_accept_peft_module_patterns_globs_and_weight_names(patterns: list[str], expected: set[str]) -> None:
    paths = ModulePaths.from_model(onnx.load(str(DATA / "encoder_torchscript_17.onnx")))
    assert {w.module for w in paths.select(patterns)} == expected


def test_suffix_pattern_does_not_match_inside_a_name() -> None:
    paths = ModulePaths.from_model(onnx.load(str(DATA / "encoder_torchscript_17.onnx")))
    with pytest.raises(ValueError, match=r"'proj' matches no MatMul/Gemm weight.*layers\.0\.attn\.q_proj"):
        paths.select(["proj"])  # PEFT matches whole dotted components, so must we


def test_adapter_for_modules_the_model_lacks_is_refused(tmp_path: Path) -> None:
    service = _service(tmp_path, "encoder_torchscript_17", ["q_proj"])
    with pytest.raises(InvalidAdapterError, match=r"'layers.0.attn.c_attn' is not a MatMul/Gemm module"):
        service.upload("wrong", read_peft_dir(DATA / "peft_conv1d"))
    # a module of the model that model.targets left out
    with pytest.raises(InvalidAdapterError, match=r"module 'layers.0.attn.v_proj' .*not a LoRA target"):
        service.upload("wrong", read_peft_dir(DATA / "peft_encoder_qvu"))
    assert service.registry.names() == []


@pytest.mark.parametrize("model", ENCODERS)
def test_files_lorad_writes_use_peft_names_that_torch_loads(tmp_path: Path, model: str) -> None:
    """What lorad writes (trainer output, OTA installs, exports) is what PEFT loaded in torch.

    ``lorad_written_head`` was written by lorad from ``peft_encoder_head`` and loaded with
    ``peft.PeftModel.from_pretrained`` by the fixture script, which recorded torch's outputs.
    """
    service = _service(tmp_path, model, ["q_proj", "v_proj", "up", "head"])
    adapter = service.parse(read_peft_dir(DATA / "peft_encoder_head"))
    written = read_peft_dir(DATA / "lorad_written_head")
    assert service.dump(adapter) == written
    service.install("trained", replace(adapter, base_fingerprint=service.engine.fingerprint), meta={"source": "trainer"})
    exported = service.export("trained")[1]
    assert exported[CONFIG_FILE] == written[CONFIG_FILE]
    assert load_safetensors(exported[WEIGHTS_FILE]).keys() == load_safetensors(written[WEIGHTS_FILE]).keys()
    np.testing.assert_allclose(service.infer(_inputs(model), "trained").outputs["logits"],
                               REF["encoder.lorad_written_head"], atol=1e-4)
    # the stored files read back under the same config (a restart)
    restarted = _service(tmp_path, model, ["q_proj", "v_proj", "up", "head"])
    np.testing.assert_allclose(restarted.infer(_inputs(model), "trained").outputs["logits"],
                               REF["encoder.lorad_written_head"], atol=1e-4)


def test_export_of_an_uploaded_adapter_has_identical_tensors(tmp_path: Path) -> None:
    service = _service(tmp_path, "encoder_dynamo_20", ["q_proj", "v_proj", "up"])
    files = read_peft_dir(DATA / "peft_encoder_qvu")
    service.upload("a", files)
    service.upload("a", read_peft_dir(DATA / "peft_encoder_qvu"))
    _, exported = service.export("a", 1)
    original, back = load_safetensors(files[WEIGHTS_FILE]), load_safetensors(exported[WEIGHTS_FILE])
    assert original.keys() == back.keys()
    for key in original:
        assert original[key].tobytes() == back[key].tobytes()


def test_peft_names_of_a_wrapper_model_match_by_dotted_suffix(tmp_path: Path) -> None:
    """An adapter trained on BertModel (``encoder.layer.0...``) fits the export of
    BertForSequenceClassification (``bert.encoder.layer.0...``) when the match is unique."""
    from safetensors.numpy import save as save_safetensors

    files = read_peft_dir(DATA / "peft_bert")
    tensors = {k.replace("base_model.model.bert.", "base_model.model."): v
               for k, v in load_safetensors(files[WEIGHTS_FILE]).items() if ".classifier." not in k}
    service = _service(tmp_path, "bert_optimum_17", ["query", "value"])
    adapter = service.parse({WEIGHTS_FILE: save_safetensors(tensors), CONFIG_FILE: files[CONFIG_FILE]})
    paths = service.engine.module_paths
    assert sorted(paths.module_of(w) for w in adapter.weights) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value"))
    assert paths.weight_of("dense") is None  # ambiguous: several modules end in .dense
