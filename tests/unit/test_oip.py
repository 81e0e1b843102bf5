"""daemon.oip: the Open Inference Protocol JSON tensor codec, every bad-input case."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from lorad.daemon.oip import (
    NonFiniteOutputError,
    OIPError,
    RequestTooLargeError,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
)


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


INPUTS = [Spec("pixels", "FP32", (-1, 4)), Spec("ids", "INT64", (-1, 2))]
OUTPUTS = [Spec("logits", "FP32", (-1, 3)), Spec("probabilities", "FP32", (-1, 3))]


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
    doc = encode_infer_response(
        model_name="demo", model_version="abc", request_id="r1",
        outputs={"logits": logits, "probabilities": probs}, wanted=("probabilities", "logits"),
        adapter="mirror", adapter_version=3,
    )
    doc = json.loads(json.dumps(doc))
    assert doc["model_name"] == "demo" and doc["model_version"] == "abc" and doc["id"] == "r1"
    assert doc["parameters"] == {"adapter": "mirror", "adapter_version": 3}
    assert [o["name"] for o in doc["outputs"]] == ["probabilities", "logits"]
    out = doc["outputs"][1]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(2, 3), logits)


def test_encode_base_model_and_generated_id() -> None:
    doc = encode_infer_response(
        model_name="demo", model_version="1", request_id=None, outputs={"logits": np.zeros((1, 3), np.float32)},
        wanted=None, adapter=None, adapter_version=None,
    )
    assert doc["parameters"] == {"adapter": None, "adapter_version": None}
    assert isinstance(doc["id"], str) and doc["id"]


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
    doc = encode_infer_response(model_name="m", model_version="1", request_id="r", outputs={"label": labels},
                                wanted=None, adapter=None, adapter_version=None)
    out = json.loads(json.dumps(doc))["outputs"][0]
    assert out == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["kitchen/light_on", "büro"]}
def test_non_finite_output_is_refused_naming_output_element_and_adapter() -> None:
    logits = np.zeros((2, 3), np.float32)
    logits[1, 2] = np.nan
    with pytest.raises(NonFiniteOutputError, match=r"answered NaN in output 'logits' element 5 \(index \[1, 2\]\) with adapter 'a' version 2"):
        encode_infer_response(
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
