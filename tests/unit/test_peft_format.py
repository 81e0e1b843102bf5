import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from lorad.adapters.errors import InvalidAdapterError
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import (
    CONFIG_FILE,
    MAX_HEADER_BYTES,
    WEIGHTS_FILE,
    dump_peft,
    load_peft,
    read_peft_dir,
    save_peft,
)


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


def _raw(header: dict[str, object], data: bytes, *, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


_A = "base_model.model.fc1.lora_A.weight"
_B = "base_model.model.fc1.lora_B.weight"


def _entry(begin: int, end: int, shape: list[int], dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw({}, b"", declared=MAX_HEADER_BYTES + 1), f"declares a header of {MAX_HEADER_BYTES + 1} bytes; lorad reads headers of at most"),
        (_raw({}, b"", declared=2**64 - 1), "declares a header of 18446744073709551615 bytes"),
        (_raw({_A: _entry(0, 48, [2, 6]), _B: _entry(48, 88, [5, 2])}, bytes(80)), "truncated or corrupt: tensor '" + _B + "' ends at byte 88"),
        (_raw({_A: _entry(0, 48, [2, 6]), _B: _entry(40, 80, [5, 2])}, bytes(80)), "tensor '" + _B + r"' \(bytes 40..80\) overlaps tensor '" + _A),
        (_raw({_A: _entry(0, 48, [2, 6]), _B: _entry(52, 92, [5, 2])}, bytes(92)), "bytes 48..52 after tensor '" + _A + "' belong to no tensor"),
        (_raw({_A: _entry(4, 52, [2, 6]), _B: _entry(52, 92, [5, 2])}, bytes(92)), "bytes 0..4 at the start of the data belong to no tensor"),
        (_raw({_A: _entry(0, 48, [2, 6]), _B: _entry(48, 88, [5, 2])}, bytes(96)), "8 bytes after the last tensor '" + _B + "' belong to no tensor"),
        (_raw({_A: _entry(0, 44, [2, 6]), _B: _entry(44, 84, [5, 2])}, bytes(84)),
         "tensor '" + _A + r"' of dtype F32 and shape \[2, 6\] needs 48 bytes, its data_offsets give 44"),
        (_raw({_A: _entry(0, 48, [2, 6], "BF16")}, bytes(48)), "tensor '" + _A + "' has dtype bfloat16; allowed"),
        (_raw({_A: _entry(0, 48, [2, -6])}, bytes(48)), r"has shape \[2, -6\]; a shape is a list of integers >= 0"),
        (_raw({_A: _entry(48, 0, [2, 6])}, bytes(48)), r"has data_offsets \[48, 0\]; expected \[begin, end\]"),
        (_raw({_A: {"dtype": "F32", "shape": [2, 6]}}, bytes(48)), "has data_offsets None"),
        (_raw({_A: [1, 2]}, b""), "must be an object with dtype, shape and data_offsets"),
        (_raw({"__metadata__": {"format": 1}}, b""), "'__metadata__' must map names to strings"),
        (struct.pack("<Q", 2) + b"[]", "header must be a JSON object, got list"),
        (struct.pack("<Q", 200) + b"[" * 100 + b"]" * 100, "header is nested too deeply: arrays and objects may nest at most 64 levels"),
    ],
    ids=["header-over-limit", "header-2^64", "offset-past-end", "overlap", "gap", "gap-at-start", "trailing-bytes",
         "bytes-vs-shape", "dtype", "negative-dim", "reversed-offsets", "no-offsets", "entry-not-object", "metadata-values",
         "header-not-object", "header-nesting"],
)
def test_safetensors_layout_is_checked_before_reading_tensors(raw: bytes, message: str) -> None:
    files = {WEIGHTS_FILE: raw, CONFIG_FILE: json.dumps({"peft_type": "LORA", "r": 2}).encode()}
    with pytest.raises(InvalidAdapterError, match=message):
        load_peft(files)


def test_a_well_formed_hand_made_file_loads() -> None:
    raw = _raw({"__metadata__": {"format": "pt"}, _A: _entry(0, 48, [2, 6]), _B: _entry(48, 88, [5, 2])},
               np.ones(22, np.float32).tobytes())
    adapter = load_peft({WEIGHTS_FILE: raw, CONFIG_FILE: json.dumps({"peft_type": "LORA", "r": 2}).encode()})
    assert adapter.weights["fc1.weight"].A.shape == (6, 2)
