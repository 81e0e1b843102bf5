import json

import numpy as np
import pytest
from safetensors.numpy import save

from lorad.adapters.errors import InvalidAdapterError
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, dump_peft, load_peft, read_peft_dir, save_peft


def _adapter() -> LoraAdapter:
    rng = np.random.default_rng(0)
    return LoraAdapter(
        rank=4, alpha=8.0, use_rslora=True, base_fingerprint="sha256:abc",
        weights={"enc.q.weight": LoraWeights(rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32))},
    )


def _peft_files(tensors: dict[str, np.ndarray], **config: object) -> dict[str, bytes]:
    return {WEIGHTS_FILE: save(tensors), CONFIG_FILE: json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}).encode()}


def test_round_trip_keeps_weights_scale_and_fingerprint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    adapter = _adapter()
    save_peft(adapter, tmp_path)
    back = load_peft(read_peft_dir(tmp_path))
    assert (back.rank, back.alpha, back.use_rslora, back.base_fingerprint) == (4, 8.0, True, "sha256:abc")
    np.testing.assert_array_equal(back.weights["enc.q.weight"].A, adapter.weights["enc.q.weight"].A)
    np.testing.assert_array_equal(back.weights["enc.q.weight"].B, adapter.weights["enc.q.weight"].B)
    assert back.scale == pytest.approx(8.0 / 2.0)


def test_files_use_peft_names_and_torch_orientation() -> None:
    files = dump_peft(_adapter())
    from safetensors.numpy import load
    tensors = load(files[WEIGHTS_FILE])
    assert tensors["base_model.model.enc.q.lora_A.weight"].shape == (4, 6)
    assert tensors["base_model.model.enc.q.lora_B.weight"].shape == (5, 4)
    config = json.loads(files[CONFIG_FILE])
    assert config["target_modules"] == ["enc.q"] and config["r"] == 4 and config["peft_type"] == "LORA"


def test_plain_peft_output_without_fingerprint_loads_and_fp16_is_widened() -> None:
    files = _peft_files({
        "base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.float16),
        "base_model.model.fc1.lora_B.weight": np.ones((5, 2), np.float16),
    })
    adapter = load_peft(files)
    assert adapter.base_fingerprint == "" and adapter.weights["fc1.weight"].A.dtype == np.float32


def test_explicit_mapping_from_module_names_to_onnx_weights() -> None:
    files = _peft_files({
        "base_model.model.encoder.query.lora_A.weight": np.ones((2, 6), np.float32),
        "base_model.model.encoder.query.lora_B.weight": np.ones((5, 2), np.float32),
    })
    adapter = load_peft(files, weight_of={"encoder.query": "onnx::MatMul_12"}.get)
    assert list(adapter.weights) == ["onnx::MatMul_12"]
    with pytest.raises(InvalidAdapterError, match=r"'encoder.query' is not a MatMul/Gemm module"):
        load_peft(files, weight_of={}.get)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({CONFIG_FILE: b"{}"}, "missing adapter_model.safetensors"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.float32)}), "no lora_B.weight"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((3, 6), np.float32),
                      "base_model.model.fc1.lora_B.weight": np.ones((5, 3), np.float32)}), r"expected \[r, in\] and \[out, r\] with r=2"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.int32),
                      "base_model.model.fc1.lora_B.weight": np.ones((5, 2), np.float32)}), "dtype int32; allowed: float16, float32, float64"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.full((2, 6), np.nan, np.float32),
                      "base_model.model.fc1.lora_B.weight": np.ones((5, 2), np.float32)}), "NaN or infinity"),
        (_peft_files({"base_model.model.fc1.lora_magnitude_vector": np.ones((5,), np.float32)}), "not a LoRA matrix"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.float32)}, r=0), "'r' must be a positive integer, got 0"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.float32)}, peft_type="IA3"), "peft_type 'IA3' is not supported"),
        (_peft_files({"base_model.model.fc1.lora_A.weight": np.ones((2, 6), np.float32)}, use_dora=True), "'use_dora' is not supported"),
        ({WEIGHTS_FILE: b"", CONFIG_FILE: b"{\"r\": 2}"}, "truncated"),
        ({WEIGHTS_FILE: save({"x": np.ones(2, np.float32)}), CONFIG_FILE: b"not json"}, "not valid JSON"),
    ],
)
def test_bad_files_are_refused_with_the_reason(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(InvalidAdapterError, match=message):
        load_peft(files)


def test_truncated_and_bit_flipped_weights_are_refused() -> None:
    files = dump_peft(_adapter())
    raw = files[WEIGHTS_FILE]
    for cut in (len(raw) // 2, len(raw) - 1, 7):
        with pytest.raises(InvalidAdapterError, match=r"truncated|corrupt"):
            load_peft({**files, WEIGHTS_FILE: raw[:cut]})
    header_flip = bytearray(raw)
    header_flip[10] ^= 0xFF
    with pytest.raises(InvalidAdapterError):
        load_peft({**files, WEIGHTS_FILE: bytes(header_flip)})


def test_missing_directory_file_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidAdapterError, match=r"adapter_model.safetensors does not exist"):
        read_peft_dir(tmp_path)
