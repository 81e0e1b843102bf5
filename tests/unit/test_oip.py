"""daemon.oip: the Open Inference Protocol JSON tensor codec, every bad-input case."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from lorad.adapters.bounded_json import loads_bounded
from lorad.daemon.oip import (
    NonFiniteOutputError,
    OIPError,
    RequestTooLargeError,
    datatype_of,
    decode_infer_request,
    header_length,
    infer_response_body,
)


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


INPUTS = [Spec("pixels", "FP32", (-1, 4)), Spec("ids", "INT64", (-1, 2))]
OUTPUTS = [Spec("logits", "FP32", (-1, 3)), Spec("probabilities", "FP32", (-1, 3))]


def _response_doc(**kw: object) -> dict[str, Any]:
    """The JSON document of an infer response as the daemon sends it."""
    body, header_length = infer_response_body(**kw)  # type: ignore[arg-type]
    assert header_length is None  # JSON alone
    doc: dict[str, Any] = json.loads(body)
    return doc



def _req(**overrides: object) -> dict[str, object]:
    tensors = {
        "pixels": {"name": "pixels", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8},
        "ids": {"name": "ids", "datatype": "INT64", "shape": [2, 2], "data": [1, 2, 3, 4]},
    }
    for k, v in overrides.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = {**tensors[k], **v}  # type: ignore[dict-item]
    return {"inputs": list(tensors.values())}


def _decode(doc: object) -> object:
    return decode_infer_request(json.dumps(doc).encode(), INPUTS, OUTPUTS)


def _error(doc: object) -> str:
    with pytest.raises(OIPError) as e:
        _decode(doc)
    assert e.value.status == 400
    return str(e.value)


def test_decodes_flat_data() -> None:
    r = decode_infer_request(json.dumps(_req()).encode(), INPUTS, OUTPUTS)
    assert r.inputs["pixels"].dtype == np.float32 and r.inputs["pixels"].shape == (2, 4)
    assert r.inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(r.inputs["ids"], [[1, 2], [3, 4]])
    assert r.adapter is None and r.id is None and r.outputs is None


def test_decodes_nested_data_and_parameters() -> None:
    doc = _req(ids={"data": [[1, 2], [3, 4]]})
    doc.update(id="req-7", parameters={"adapter": "mirror"}, outputs=[{"name": "probabilities"}])
    r = decode_infer_request(doc, INPUTS, OUTPUTS)
    np.testing.assert_array_equal(r.inputs["ids"], [[1, 2], [3, 4]])
    assert (r.adapter, r.id, r.outputs) == ("mirror", "req-7", ("probabilities",))


def test_ints_accepted_for_float_inputs() -> None:
    r = decode_infer_request(_req(pixels={"data": [1] * 8}), INPUTS, OUTPUTS)
    assert r.inputs["pixels"].dtype == np.float32


def test_unknown_input_lists_allowed() -> None:
    doc = _req()
    doc["inputs"].append({"name": "pixles", "datatype": "FP32", "shape": [1], "data": [1]})  # type: ignore[attr-defined]
    msg = _error(doc)
    assert "unknown input 'pixles'" in msg and "pixels, ids" in msg


def test_missing_input_named() -> None:
    msg = _error(_req(ids=None))
    assert "missing input 'ids'" in msg and "pixels, ids" in msg


def test_wrong_datatype_names_allowed() -> None:
    msg = _error(_req(pixels={"datatype": "FP64"}))
    assert "input 'pixels'" in msg and "'FP64'" in msg and "expects 'FP32'" in msg


def test_shape_mismatch() -> None:
    msg = _error(_req(pixels={"shape": [2, 5], "data": [0.0] * 10}))
    assert "input 'pixels': shape [2, 5] does not match the model's shape [N, 4]" in msg
    msg = _error(_req(pixels={"shape": [8]}))
    assert "shape [8] does not match" in msg


@pytest.mark.parametrize("shape", ["2x4", [2, -4], [2, 4.0], [True, 4], None])
def test_malformed_shape(shape: object) -> None:
    assert "'shape' must be an array of non-negative integers" in _error(_req(pixels={"shape": shape}))


def test_data_length_differs_from_shape() -> None:
    msg = _error(_req(pixels={"data": [0.5] * 7}))
    assert "input 'pixels': data has 7 elements but shape [2, 4] needs 8" in msg


@pytest.mark.parametrize("bad", ["0.5", None, True, {"x": 1}])
def test_non_numeric_data(bad: object) -> None:
    data = [0.5] * 7 + [bad]
    msg = _error(_req(pixels={"data": data}))
    assert "input 'pixels': FP32 data must be numbers" in msg


def test_floats_refused_for_integer_input() -> None:
    assert "INT64 data must be integers, found 1.5" in _error(_req(ids={"data": [1, 2, 3, 1.5]}))


def test_integer_out_of_range() -> None:
    assert "must lie in" in _error(_req(ids={"data": [1, 2, 3, 2**70]}))


def test_float_overflow() -> None:
    assert "does not fit in FP32" in _error(_req(pixels={"data": [1e300] + [0.0] * 7}))


def test_missing_data() -> None:
    doc = _req()
    del doc["inputs"][0]["data"]  # type: ignore[index]
    assert "input 'pixels': 'data' is missing" in _error(doc)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ([1, 2], "must be a JSON object"),
        ({"inputs": []}, "'inputs' must be a non-empty array"),
        ({"inputs": "x"}, "'inputs' must be a non-empty array"),
        ({"inputs": [5]}, "inputs[0] must be an object"),
        ({"inputs": [{"shape": [1]}]}, "inputs[0] has no string 'name'"),
        ({**_req(), "id": 5}, "'id' must be a string"),
        ({**_req(), "parameters": {"adapter": 3}}, "'parameters.adapter' must be an adapter name"),
        ({**_req(), "parameters": []}, "'parameters' must be an object"),
        ({**_req(), "outputs": [{"name": "nope"}]}, "unknown output 'nope'; the model's outputs are: logits, probabilities"),
        ({**_req(), "outputs": [{"name": "logits"}, {"name": "logits"}]}, "requested twice"),
        ({**_req(), "extra": 1}, "unknown request field 'extra'"),
    ],
)
def test_request_structure_errors(doc: object, fragment: str) -> None:
    assert fragment in _error(doc)


def test_duplicate_input() -> None:
    doc = _req()
    doc["inputs"].append(doc["inputs"][0])  # type: ignore[attr-defined]
    assert "input 'pixels' is given twice" in _error(doc)


def test_invalid_json() -> None:
    with pytest.raises(OIPError, match="not valid JSON"):
        decode_infer_request(b"{not json", INPUTS, OUTPUTS)


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    doc = _req()
    body = json.dumps(doc).replace('"data": [0.5, 0.5', '"data": ' + "[" * 100_000 + "0.5" + "]" * 100_000 + ', [0.5', 1)
    with pytest.raises(OIPError, match="nested too deeply"):
        decode_infer_request(body.encode(), INPUTS, OUTPUTS)
    data: object = 0.5
    for _ in range(500):
        data = [data]
    assert "nested too deeply" in _error(_req(pixels={"data": data}))
    # An already parsed document (the examples route's) is walked level by level, never recursively.
    with pytest.raises(OIPError, match=r"input 'pixels': data is an array of 1 where shape \[2, 4\] needs an array of 2"):
        decode_infer_request(_req(pixels={"data": data}), INPUTS, OUTPUTS)


@pytest.mark.parametrize("depth", [65, 900, 1000, 5000])
def test_json_nested_past_the_limit_is_refused_before_parsing(depth: int) -> None:
    body = b'{"inputs": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    with pytest.raises(OIPError, match="nested too deeply: arrays and objects may nest at most 64 levels"):
        decode_infer_request(body, INPUTS, OUTPUTS)


def test_json_nested_to_the_limit_is_parsed() -> None:
    body = b'{"inputs": ' + b"[" * 63 + b"]" * 63 + b', "id": "[[[[' + b"[" * 100 + b'"}'
    with pytest.raises(OIPError, match=r"inputs\[0\] must be an object"):  # parsed: the structure is what is wrong
        decode_infer_request(body, INPUTS, OUTPUTS)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([[0.5] * 4, [0.5] * 3], "data[1] is an array of 3 where shape [2, 4] needs an array of 4"),
        ([[0.5] * 4, 0.5, 0.5, 0.5, 0.5], "data is an array of 5 where shape [2, 4] needs an array of 2"),
        ([[0.5] * 4, [[0.5]] * 4], "is nested deeper than shape [2, 4] (element 4 (index [1, 0]) is an array)"),
        ([[0.5] * 4, "x"], "data[1] is a string 'x' where shape [2, 4] needs an array of 4"),
        ([[[0.5] * 2] * 2] * 2, "data[0] is an array of 2 where shape [2, 4] needs an array of 4"),
    ],
    ids=["short-row", "mixed-flat-and-nested", "too-deep", "string-row", "wrong-rank"],
)
def test_ragged_or_misnested_data_is_400_naming_tensor_and_position(data: object, fragment: str) -> None:
    msg = _error(_req(pixels={"data": data}))
    assert msg.startswith("input 'pixels': ") and fragment in msg, msg
    assert "flat (row-major) or nested exactly as the shape" in msg


def test_a_tensor_without_rows_is_400() -> None:
    # OIP allows empty tensors; lorad answers requests of at least one row (documented in openapi.yaml).
    msg = _error(_req(pixels={"shape": [0, 4], "data": []}))
    assert "input 'pixels': shape [0, 4] has no elements; a request carries at least one row (every dimension >= 1, like [1, 4])" in msg


def test_encode_response_round_trips_float32_exactly() -> None:
    logits = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    probs = np.full((2, 3), 1 / 3, np.float32)
    doc = _response_doc(
        model_name="demo", model_version="abc", request_id="r1",
        outputs={"logits": logits, "probabilities": probs}, wanted=("probabilities", "logits"),
        adapter="mirror", adapter_version=3,
    )
    assert doc["model_name"] == "demo" and doc["model_version"] == "abc" and doc["id"] == "r1"
    assert doc["parameters"] == {"adapter": "mirror", "adapter_version": 3}
    assert [o["name"] for o in doc["outputs"]] == ["probabilities", "logits"]
    out = doc["outputs"][1]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(2, 3), logits)


def test_encode_base_model_and_generated_id() -> None:
    doc = _response_doc(
        model_name="demo", model_version="1", request_id=None, outputs={"logits": np.zeros((1, 3), np.float32)},
        wanted=None, adapter=None, adapter_version=None,
    )
    assert doc["parameters"] == {"adapter": None, "adapter_version": None}
    assert isinstance(doc["id"], str) and doc["id"]
    again = _response_doc(
        model_name="demo", model_version="1", request_id=None, outputs={"logits": np.zeros((1, 3), np.float32)},
        wanted=None, adapter=None, adapter_version=None,
    )
    assert again["id"] != doc["id"]  # each response its own


def test_datatype_of() -> None:
    assert datatype_of(np.zeros(1, np.int64)) == "INT64"
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        datatype_of(np.zeros(1, np.complex64))


TEXT = [Spec("text", "BYTES", (-1,))]


def _text(data: object, shape: list[int] | None = None) -> dict[str, object]:
    n = len(data) if isinstance(data, list) else 1
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [n], "data": data}]}


def test_bytes_input_decodes_strings_to_utf8_bytes() -> None:
    r = decode_infer_request(json.dumps(_text(["turn on the lamp", "Grüße"])).encode(), TEXT, OUTPUTS)
    column = r.inputs["text"]
    assert column.dtype == object and column.shape == (2,)
    assert list(column) == [b"turn on the lamp", "Grüße".encode()]


def test_bytes_input_refuses_non_strings_and_keeps_lone_surrogates_for_the_consumer() -> None:
    with pytest.raises(OIPError, match=r"input 'text': BYTES data must be strings, found 3 at index 1"):
        decode_infer_request(json.dumps(_text(["a", 3])).encode(), TEXT, OUTPUTS)
    with pytest.raises(OIPError, match=r"data has 2 elements but shape \[3\] needs 3"):
        decode_infer_request(json.dumps(_text(["a", "b"], [3])).encode(), TEXT, OUTPUTS)
    # "\ud800" is valid JSON but not UTF-8 text: passed on as its bytes, for the tokenizer step to name
    r = decode_infer_request(b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', TEXT, OUTPUTS)
    with pytest.raises(UnicodeDecodeError):
        bytes(r.inputs["text"][0]).decode("utf-8")


def test_body_that_is_not_utf8_is_named() -> None:
    with pytest.raises(OIPError, match=r"request body is not valid UTF-8 \(invalid start byte at byte 1\)"):
        decode_infer_request(b'"\xff"', TEXT, OUTPUTS)


def test_bytes_output_encodes_as_strings() -> None:
    labels = np.array([b"kitchen/light_on", "büro".encode()], dtype=object)
    doc = _response_doc(model_name="m", model_version="1", request_id="r", outputs={"label": labels},
                        wanted=None, adapter=None, adapter_version=None)
    out = doc["outputs"][0]
    assert out == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["kitchen/light_on", "büro"]}
def test_non_finite_output_is_refused_naming_output_element_and_adapter() -> None:
    logits = np.zeros((2, 3), np.float32)
    logits[1, 2] = np.nan
    with pytest.raises(NonFiniteOutputError, match=r"answered NaN in output 'logits' element 5 \(index \[1, 2\]\) with adapter 'a' version 2"):
        infer_response_body(
            model_name="demo", model_version="1", request_id=None, outputs={"logits": logits},
            wanted=None, adapter="a", adapter_version=2,
        )


def test_composition_parameters() -> None:
    body = {**_req(), "parameters": {"adapters": [{"name": "user-7", "weight": 1.0}, {"name": "site-east", "weight": 0.5}]}}
    req = decode_infer_request(body, INPUTS, OUTPUTS)
    assert req.adapter is None and req.composition == (("user-7", 1.0), ("site-east", 0.5))
    assert decode_infer_request({**_req(), "parameters": {"adapters": [{"name": "a"}]}}, INPUTS, OUTPUTS).composition == (("a", 1.0),)
    for params, fragment in [
        ({"adapter": "a", "adapters": [{"name": "b"}]}, "not both"),
        ({"adapters": []}, "array of 1 to 8"),
        ({"adapters": [{"name": "a", "weight": "x"}]}, "weight must be a finite number"),
        ({"adapters": [{"name": "a", "scale": 1}]}, "'name' and optional 'weight'"),
        ({"adapters": [{"weight": 1}]}, "name must be an adapter name"),
    ]:
        with pytest.raises(OIPError, match=re.escape(fragment)):
            decode_infer_request({**_req(), "parameters": params}, INPUTS, OUTPUTS)


def test_rows_beyond_max_rows_are_too_large() -> None:
    with pytest.raises(RequestTooLargeError, match=r"'pixels' has 2 rows; a request may carry at most 1"):
        decode_infer_request(_req(), INPUTS, OUTPUTS, max_rows=1)


def test_non_finite_inputs_allowed_when_the_model_says_so() -> None:
    body = _req(pixels={"data": [float("nan")] + [0.5] * 7})
    with pytest.raises(OIPError, match=r"element 0 \(index \[0, 0\]\) is NaN"):
        decode_infer_request(body, INPUTS, OUTPUTS)
    assert np.isnan(decode_infer_request(body, INPUTS, OUTPUTS, allow_non_finite=True).inputs["pixels"][0, 0])


# ---------------------------------------------------------------- the binary tensor data extension


def _binary_body(doc: Mapping[str, object], *raw: bytes) -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + b"".join(raw), len(head)


def _binary_req(pixels: np.ndarray, ids: np.ndarray, **pixel_params: object) -> tuple[bytes, int]:
    p, i = pixels.astype("<f4").tobytes(), ids.astype("<i8").tobytes()
    doc = {"inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
         "parameters": {"binary_data_size": len(p), **pixel_params}},
        {"name": "ids", "datatype": "INT64", "shape": list(ids.shape), "parameters": {"binary_data_size": len(i)}},
    ]}
    return _binary_body(doc, p, i)


def _binary_error(body: bytes, json_length: int | None, inputs: list[Spec] = INPUTS) -> str:
    with pytest.raises(OIPError) as e:
        decode_infer_request(body, inputs, OUTPUTS, json_length=json_length)
    assert e.value.status == 400
    return str(e.value)


def test_binary_inputs_decode_exactly() -> None:
    pixels = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    ids = np.arange(4, dtype=np.int64).reshape(2, 2) - 2
    body, n = _binary_req(pixels, ids)
    r = decode_infer_request(body, INPUTS, OUTPUTS, json_length=n)
    assert r.inputs["pixels"].dtype == np.float32 and np.array_equal(r.inputs["pixels"], pixels)
    assert r.inputs["ids"].dtype == np.int64 and np.array_equal(r.inputs["ids"], ids)
    assert r.binary_outputs == frozenset()


def test_binary_and_json_inputs_mix() -> None:
    ids = np.array([[7, 8]], np.int64)
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                      {"name": "ids", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}}]}
    body, n = _binary_body(doc, ids.tobytes())
    r = decode_infer_request(body, INPUTS, OUTPUTS, json_length=n)
    assert r.inputs["pixels"].tolist() == [[1, 2, 3, 4]] and r.inputs["ids"].tolist() == [[7, 8]]


def test_binary_bytes_and_bool_inputs() -> None:
    specs = [Spec("text", "BYTES", (-1,)), Spec("flags", "BOOL", (-1, 2))]
    words = [b"hello", b"", "gr\u00fc\u00dfe".encode()]
    text = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(text)}},
                      {"name": "flags", "datatype": "BOOL", "shape": [3, 2], "parameters": {"binary_data_size": 6}}]}
    body, n = _binary_body(doc, text, bytes([1, 0, 0, 1, 1, 1]))
    r = decode_infer_request(body, specs, OUTPUTS, json_length=n)
    assert r.inputs["text"].tolist() == words
    assert r.inputs["flags"].tolist() == [[True, False], [False, True], [True, True]]
    bad, n = _binary_body(doc, text, bytes([1, 0, 2, 1, 1, 1]))
    assert "BOOL data is one byte each, 0 or 1" in _binary_error(bad, n, specs)


@pytest.mark.parametrize("cut, fragment", [
    (-4, "only 28 bytes of binary data are left"),  # the last input is short
    (+4, "4 bytes follow the JSON header (Inference-Header-Content-Length) beyond the inputs'"),
])
def test_binary_data_that_does_not_add_up_is_400(cut: int, fragment: str) -> None:
    body, n = _binary_req(np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64))
    body = body[:cut] if cut < 0 else body + b"\0" * cut
    assert fragment in _binary_error(body, n)


def test_binary_size_not_matching_shape_and_datatype_is_400() -> None:
    pixels = np.zeros((2, 4), np.float32)
    p = pixels.tobytes()
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 24}},
                      {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}
    body, n = _binary_body(doc, p[:24])
    assert "binary_data_size is 24 bytes but shape [2, 4] of FP32 needs 32" in _binary_error(body, n)


@pytest.mark.parametrize("size", [-1, 1.5, "8", True, None])
def test_binary_size_must_be_a_byte_count(size: object) -> None:
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": size}},
                      {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}
    body, n = _binary_body(doc, bytes(16))
    if size is None:  # no size: a JSON tensor without data, and 16 bytes nobody claims
        assert "'data' is missing" in _binary_error(body, n)
    else:
        assert "binary_data_size must be a number of bytes" in _binary_error(body, n)


def test_binary_size_without_the_header_is_400() -> None:
    body, n = _binary_req(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.int64))
    assert "has no Inference-Header-Content-Length header" in _binary_error(body[:n], None)  # JSON alone
    error = _binary_error(body, None)  # JSON and the bytes, without saying where the JSON ends
    assert "not valid JSON" in error and "needs the Inference-Header-Content-Length header" in error


def test_binary_size_and_data_together_is_400() -> None:
    body, n = _binary_req(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.int64))
    doc = json.loads(body[:n])
    doc["inputs"][0]["data"] = [0, 0, 0, 0]
    body2, n2 = _binary_body(doc, body[n:])
    assert "gives both 'data' and parameters.binary_data_size" in _binary_error(body2, n2)


def test_binary_non_finite_floats_are_400_naming_the_element() -> None:
    pixels = np.zeros((1, 4), np.float32)
    pixels[0, 2] = np.nan
    body, n = _binary_req(pixels, np.zeros((1, 2), np.int64))
    assert "input 'pixels': element 2 (index [0, 2]) is NaN" in _binary_error(body, n)


@pytest.mark.parametrize("blob", [
    b"\x05\x00\x00\x00abc",          # an element longer than what is left
    b"\x01\x00\x00",                  # a length cut short
    b"\x01\x00\x00\x00a\x00",          # a byte left after the elements
])
def test_binary_bytes_framing_errors_are_400(blob: bytes) -> None:
    specs = [Spec("text", "BYTES", (-1,))]
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}]}
    body, n = _binary_body(doc, blob)
    assert "input 'text': " in _binary_error(body, n, specs)


@pytest.mark.parametrize("value, body_length, fragment", [
    ("abc", 10, "is not a length in bytes"),
    ("-3", 10, "is not a length in bytes"),
    ("11", 10, "is 11 bytes but the whole request body is 10 bytes"),
    ("0", 10, "must start with the JSON header"),
    ("9" * 40, 10, "is not a length in bytes"),
])
def test_header_length_is_checked(value: str, body_length: int, fragment: str) -> None:
    with pytest.raises(OIPError, match=re.escape(fragment)):
        header_length(value, body_length)
    assert header_length(None, 10) is None and header_length(" 7 ", 10) == 7


def test_header_length_cutting_the_json_is_400() -> None:
    body, n = _binary_req(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.int64))
    assert "not valid JSON" in _binary_error(body, n - 3)


def test_binary_outputs_are_chosen_per_output_or_for_all() -> None:
    doc = {**_req(), "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}
    r = decode_infer_request(json.dumps(doc).encode(), INPUTS, OUTPUTS)
    assert r.binary_outputs == {"logits"} and r.outputs == ("logits", "probabilities")
    doc = {**_req(), "parameters": {"binary_data_output": True}}
    assert decode_infer_request(json.dumps(doc).encode(), INPUTS, OUTPUTS).binary_outputs == {"logits", "probabilities"}
    # an output's own setting wins over the request's
    doc = {**_req(), "parameters": {"binary_data_output": True},
           "outputs": [{"name": "logits", "parameters": {"binary_data": False}}, {"name": "probabilities"}]}
    assert decode_infer_request(json.dumps(doc).encode(), INPUTS, OUTPUTS).binary_outputs == {"probabilities"}


@pytest.mark.parametrize("doc, fragment", [
    ({"parameters": {"binary_data_output": 1}}, "'parameters.binary_data_output' must be true or false"),
    ({"outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}, "outputs[0].parameters.binary_data"),
    ({"outputs": [{"name": "logits", "parameters": []}]}, "outputs[0].parameters must be an object"),
    ({"outputs": [{"name": "logits", "parameters": {"classification": 3}}]}, "classification is not supported"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], "parameters": 5},
                 {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}, "'parameters' must be an object"),
])
def test_binary_parameters_are_checked(doc: dict[str, object], fragment: str) -> None:
    assert fragment in _error({**_req(), **doc})


def test_binary_response_body_round_trips() -> None:
    logits = np.array([[0.1, -2.5, np.float32(1) / 3]], np.float32)
    labels = np.array([b"light_on"], dtype=object)
    body, n = infer_response_body(
        model_name="m", model_version="1", request_id="r", outputs={"logits": logits, "label": labels},
        wanted=None, adapter=None, adapter_version=None, binary={"logits", "label"})
    assert n is not None
    head = json.loads(body[:n])
    by_name = {t["name"]: t for t in head["outputs"]}
    assert "data" not in by_name["logits"] and by_name["logits"]["parameters"] == {"binary_data_size": 12}
    assert np.array_equal(np.frombuffer(body[n : n + 12], "<f4").reshape(1, 3), logits)
    assert body[n + 12 :] == (8).to_bytes(4, "little") + b"light_on"
    assert by_name["label"]["parameters"] == {"binary_data_size": 12}


def test_json_response_body_carries_every_value_exactly() -> None:
    outputs: dict[str, np.ndarray] = {"logits": np.array([[0.1, 1e-30, -3.4e38]], np.float32), "ids": np.array([[1, -2]], np.int64)}
    kw = dict(model_name="m", model_version="1", request_id="r", outputs=outputs, wanted=None, adapter="a", adapter_version=2)
    doc = _response_doc(**kw)
    assert doc["parameters"] == {"adapter": "a", "adapter_version": 2} and doc["id"] == "r"
    assert [(t["name"], t["datatype"], t["shape"]) for t in doc["outputs"]] == [("logits", "FP32", [1, 3]), ("ids", "INT64", [1, 2])]
    for got in doc["outputs"]:
        want = outputs[got["name"]]
        assert np.array_equal(np.asarray(got["data"], want.dtype).reshape(want.shape), want)
    with pytest.raises(NonFiniteOutputError):
        infer_response_body(**{**kw, "outputs": {"logits": np.array([np.inf], np.float32)}})  # type: ignore[arg-type]
    # a binary output may carry what JSON cannot
    body, n = infer_response_body(**{**kw, "outputs": {"logits": np.array([np.inf], np.float32)}}, binary={"logits"})  # type: ignore[arg-type]
    assert n is not None and np.isinf(np.frombuffer(body[n:], "<f4")).all()


@pytest.mark.parametrize("raw", [
    b'{"a": 123456789012345678901234567890}', b'[NaN, Infinity]', b'"\\ud800"', b'[1e400]', b'{"a": 1.5, "b": [true, null]}',
    '{"x": "\u00e9"}'.encode("utf-16"), b'[0.00012345678901234567, -99999999999999999999]',
])
def test_loads_bounded_reads_what_json_reads(raw: bytes) -> None:
    """orjson reads first; what it refuses or would read otherwise goes to json, so the
    document (or the error) is json's."""
    def outcome(fn: object) -> object:
        try:
            return ("ok", repr(fn()))  # type: ignore[operator]
        except ValueError as e:
            return ("error", type(e).__name__)

    assert outcome(lambda: loads_bounded(raw)) == outcome(lambda: json.loads(raw))
