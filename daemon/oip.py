"""Open Inference Protocol (KServe v2 REST) tensors: pure encode/decode functions.

No I/O here: bytes or parsed JSON in, numpy arrays or a JSON-ready dict (or the response
bytes) out, :class:`OIPError` (an HTTP 400) naming exactly what was wrong otherwise.

Tensors travel as JSON ``data`` or with the binary tensor data extension (what
``tritonclient`` sends with ``binary_data=True``): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw bytes of every input whose
``parameters.binary_data_size`` says how many, in the order of ``inputs``; little-endian,
row-major, BOOL one byte each, BYTES as 4-byte little-endian lengths each followed by its
bytes. Outputs asked for with ``parameters.binary_data: true`` (or every output, with the
request's ``parameters.binary_data_output: true``) come back the same way.
"""

from __future__ import annotations

import itertools
import math
import secrets
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import orjson

from lorad.adapters.bounded_json import JsonInputError, loads_bounded

__all__ = [
    "OIPError",
    "decode_adapter_parameters",
    "RequestTooLargeError",
    "NonFiniteOutputError",
    "TensorSpecLike",
    "InferRequest",
    "DATATYPES",
    "datatype_of",
    "decode_infer_request",
    "infer_response_body",
    "header_length",
    "HEADER_LENGTH",
    "tensor_metadata",
]

#: The HTTP header of the binary tensor data extension: the length of the JSON part.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: OIP datatype → numpy dtype. BYTES (text for models that declare a tokenizer) travels
#: as JSON strings and becomes a numpy object array of ``bytes``.
DATATYPES: dict[str, np.dtype] = {
    "BYTES": np.dtype(object),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()}


class OIPError(ValueError):
    """The request is malformed; maps to HTTP 400 with the message as ``error``."""

    status = 400


class RequestTooLargeError(OIPError):
    """The request body exceeds the configured limit; HTTP 413."""

    status = 413


class NonFiniteOutputError(RuntimeError):
    """The model answered NaN or infinity, which JSON cannot carry: a model error (HTTP 500
    class), never a response with non-JSON numbers."""

    status = 500


class TensorSpecLike(Protocol):
    """What the codec needs of an engine's input/output spec."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    #: Adapter name from ``parameters.adapter``; ``None`` = base model.
    adapter: str | None
    id: str | None
    #: Requested output names, in order; ``None`` = all outputs.
    outputs: tuple[str, ...] | None
    #: ``parameters.adapters``: (name, weight) terms of a per-request composition.
    composition: tuple[tuple[str, float], ...] = ()
    #: Outputs to answer as raw bytes (binary tensor data extension).
    binary_outputs: frozenset[str] = frozenset()


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (ValueError for dtypes OIP has no name for)."""
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def tensor_metadata(spec: TensorSpecLike) -> dict[str, object]:
    """A tensor's entry of the model metadata response."""
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def decode_infer_request(
    body: bytes | Mapping[str, object],
    inputs: Sequence[TensorSpecLike],
    outputs: Sequence[TensorSpecLike],
    *,
    allow_non_finite: bool = False,
    max_rows: int | None = None,
    json_length: int | None = None,
) -> InferRequest:
    """Parse and check an infer request against the model's input and output specs.

    The body's size is limited while it streams in (daemon.http_api.read_body); its JSON
    may nest at most :data:`lorad.adapters.bounded_json.MAX_JSON_DEPTH` levels, checked
    before it is parsed. A tensor's ``data`` is flat (row-major) or nested exactly as its
    ``shape`` (a ragged array is refused naming the tensor and the position), and holds
    ``prod(shape)`` elements; a shape with a 0 dimension (no rows) is refused: lorad
    answers a request with at least one row. Floating point data must be finite
    (``NaN``, ``Infinity``, ``1e400`` are refused naming the tensor and the element)
    unless ``allow_non_finite`` says the model accepts them. More than ``max_rows`` rows
    (first dimension) is a :class:`RequestTooLargeError`, found from the shapes before
    any data is converted.

    ``json_length`` (from :func:`header_length`) says the body is a binary one: its first
    ``json_length`` bytes are the JSON header, the rest the raw bytes of the inputs that
    give ``parameters.binary_data_size``; they must add up to exactly that rest.
    """
    binary = None
    if json_length is not None:
        if not isinstance(body, (bytes, bytearray)):
            raise TypeError("json_length needs the request body as bytes")
        binary = _Binary(memoryview(body)[json_length:])
        body = bytes(body[:json_length])
    if isinstance(body, (bytes, bytearray)):
        try:
            doc = loads_bounded(bytes(body), what="request body")
        except JsonInputError as e:  # invalid, not UTF-8, nested over MAX_JSON_DEPTH, unreadable number
            hint = ""
            if json_length is None and "Extra data" in str(e):
                hint = f"; a body of JSON followed by binary tensor data needs the {HEADER_LENGTH} header"
            raise OIPError(f"{e}{hint}") from None
    else:
        doc = body
    if not isinstance(doc, Mapping):
        raise OIPError(f"request body must be a JSON object, got {_json_type(doc)}")
    if not doc.keys() <= _REQUEST_FIELDS and (unknown := sorted(set(doc) - _REQUEST_FIELDS)):
        raise OIPError(f"unknown request field {unknown[0]!r}; allowed: id, inputs, outputs, parameters")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OIPError(f"'id' must be a string, got {_json_type(request_id)}")

    params = doc.get("parameters")
    adapter, composition = decode_adapter_parameters(params)
    arrays = _decode_inputs(doc.get("inputs"), inputs, allow_non_finite=allow_non_finite, max_rows=max_rows,
                            binary=binary)
    if binary is not None:
        binary.check_consumed()
    all_binary = _flag(params.get("binary_data_output") if isinstance(params, Mapping) else None,
                       "parameters.binary_data_output")
    wanted, binary_outputs = _decode_outputs(doc.get("outputs"), outputs, all_binary=all_binary)
    return InferRequest(inputs=arrays, adapter=adapter, id=request_id, outputs=wanted, composition=composition,
                        binary_outputs=binary_outputs)


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from an ``Inference-Header-Content-Length`` value; None
    without the header (the body is JSON alone). :class:`OIPError` for a value that is not
    a length within the body."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise OIPError(f"{HEADER_LENGTH}: {value[:40]!r} is not a length in bytes (a non-negative integer)")
    n = int(text)
    if n > body_length:
        raise OIPError(f"{HEADER_LENGTH} is {n} bytes but the whole request body is {body_length} bytes;"
                       " it gives the length of the JSON header that starts the body")
    if n == 0:
        raise OIPError(f"{HEADER_LENGTH} is 0: the body must start with the JSON header of the request")
    return n


def infer_response_body(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    wanted: Sequence[str] | None,
    adapter: str | None,
    adapter_version: int | None,
    composition: Sequence[Mapping[str, object]] = (),
    binary: Collection[str] = (),
) -> tuple[bytes, int | None]:
    """An infer response as bytes, and the length of its JSON header when outputs named in
    ``binary`` follow it as raw bytes (``Inference-Header-Content-Length``), else None.

    ``wanted`` selects and orders outputs. A binary output carries
    ``parameters.binary_data_size`` instead of ``data``. A binary output may hold NaN or
    infinity (raw floats can); a JSON one raises :class:`NonFiniteOutputError`, naming the
    output, the element and the adapter that answered (JSON has no such numbers).
    """
    doc, raw = _response(model_name=model_name, model_version=model_version, request_id=request_id, outputs=outputs,
                         wanted=wanted, adapter=adapter, adapter_version=adapter_version, composition=composition,
                         binary=binary)
    try:
        head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # an array orjson does not take as it is (byte order, layout)
        for t in doc["outputs"]:  # type: ignore[attr-defined]
            if isinstance(t.get("data"), np.ndarray):
                t["data"] = t["data"].tolist()
        head = orjson.dumps(doc)
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)


#: Ids of responses to requests that named none: unique within a daemon's run (a counter)
#: and across runs (a random prefix per process), without the system call per request a
#: uuid4 makes.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def _response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    wanted: Sequence[str] | None,
    adapter: str | None,
    adapter_version: int | None,
    composition: Sequence[Mapping[str, object]],
    binary: Collection[str],
) -> tuple[dict[str, object], list[bytes]]:
    """The response's JSON object (its data as flat numpy arrays, for orjson) and the raw
    bytes of its binary outputs, in order."""
    names = list(wanted) if wanted is not None else list(outputs)
    tensors = []
    raw: list[bytes] = []
    for name in names:
        arr = np.asarray(outputs[name])
        if name in binary:
            datatype = datatype_of(arr)
            chunk = _bytes_to_binary(arr) if datatype == "BYTES" else _raw(arr)
            raw.append(chunk)
            tensors.append({"name": name, "datatype": datatype, "shape": list(arr.shape),
                            "parameters": {"binary_data_size": len(chunk)}})
            continue
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.argmin(np.isfinite(arr).ravel()))
            if composition:
                by = "adapters " + ", ".join(f"{c.get('name')!r} version {c.get('version')}" for c in composition)
            else:
                by = "the base model" if adapter is None else f"adapter {adapter!r} version {adapter_version}"
            raise NonFiniteOutputError(
                f"the model answered {_number(arr.ravel()[bad])} in output {name!r} element {_where(bad, arr.shape)}"
                f" with {by}; JSON cannot carry non-finite numbers, so no response was sent"
            )
        datatype = datatype_of(arr)
        data: object
        if datatype == "BYTES":
            data = _bytes_to_json(arr)
        else:
            data = np.ascontiguousarray(arr).ravel()
        tensors.append({"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data})
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id if request_id is not None else f"{_ID_PREFIX}-{next(_ids)}",
        "parameters": (
            {"adapters": [dict(c) for c in composition]} if composition
            else {"adapter": adapter, "adapter_version": adapter_version}
        ),
        "outputs": tensors,
    }, raw


# ---------------------------------------------------------------- helpers


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


#: Adapters one request may compose with ``parameters.adapters``.
MAX_COMPOSITION = 8
_COMPOSITION_FORM = '[{"name": "user-7", "weight": 1.0}, {"name": "site-east", "weight": 0.5}]'


def decode_adapter_parameters(params: object) -> tuple[str | None, tuple[tuple[str, float], ...]]:
    if params is None:
        return None, ()
    if not isinstance(params, Mapping):
        raise OIPError(f"'parameters' must be an object, got {_json_type(params)}")
    adapter = params.get("adapter")
    terms = params.get("adapters")
    if adapter is not None and terms is not None:
        raise OIPError("give either 'parameters.adapter' (one adapter) or 'parameters.adapters' (a composition), not both")
    if terms is not None:
        return None, _decode_composition(terms)
    if adapter is None:
        return None, ()
    if not isinstance(adapter, str) or not adapter:
        raise OIPError(f"'parameters.adapter' must be an adapter name (a string) or null, got {_json_type(adapter)}")
    return adapter, ()


def _decode_composition(terms: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(terms, list) or not 1 <= len(terms) <= MAX_COMPOSITION:
        raise OIPError(
            f"'parameters.adapters' must be an array of 1 to {MAX_COMPOSITION} objects like {_COMPOSITION_FORM},"
            f" got {_json_type(terms)}" + (f" of {len(terms)}" if isinstance(terms, list) else "")
        )
    out: list[tuple[str, float]] = []
    for i, term in enumerate(terms):
        if not isinstance(term, Mapping) or set(term) - {"name", "weight"}:
            raise OIPError(f"parameters.adapters[{i}] must be an object with 'name' and optional 'weight'")
        name, weight = term.get("name"), term.get("weight", 1.0)
        if not isinstance(name, str) or not name:
            raise OIPError(f"parameters.adapters[{i}].name must be an adapter name (a string)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise OIPError(f"parameters.adapters[{i}].weight must be a finite number, got {weight!r}")
        out.append((name, float(weight)))
    return tuple(out)


def _flag(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OIPError(f"{where!r} must be true or false, got {_json_type(value)}")
    return value


def _decode_outputs(
    requested: object, specs: Sequence[TensorSpecLike], *, all_binary: bool
) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    """The outputs asked for (None: all), and those to answer as raw bytes."""
    allowed = [s.name for s in specs]
    if requested is None:
        return None, frozenset(allowed if all_binary else ())
    if not isinstance(requested, list) or not requested:
        raise OIPError(f"'outputs' must be a non-empty array of {{\"name\": ...}} objects, got {_json_type(requested)}")
    names: list[str] = []
    binary: set[str] = set()
    for i, item in enumerate(requested):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            raise OIPError(f"outputs[{i}] must be an object with a string 'name'")
        if name not in allowed:
            raise OIPError(f"unknown output {name!r}; the model's outputs are: {', '.join(allowed)}")
        if name in names:
            raise OIPError(f"output {name!r} is requested twice")
        names.append(name)
        params = item.get("parameters")
        if params is None:
            binary_data = None
        elif not isinstance(params, Mapping):
            raise OIPError(f"outputs[{i}].parameters must be an object, got {_json_type(params)}")
        else:
            if params.get("classification") is not None:
                raise OIPError(f"outputs[{i}]: parameters.classification is not supported; ask for the output itself")
            binary_data = params.get("binary_data")
        if _flag(binary_data, f"outputs[{i}].parameters.binary_data") if binary_data is not None else all_binary:
            binary.add(name)
    return tuple(names), frozenset(binary)


def _decode_inputs(
    tensors: object, specs: Sequence[TensorSpecLike], *, allow_non_finite: bool, max_rows: int | None,
    binary: _Binary | None = None,
) -> dict[str, np.ndarray]:
    by_name = {s.name: s for s in specs}
    allowed = ", ".join(by_name)
    if not isinstance(tensors, list) or not tensors:
        raise OIPError(f"'inputs' must be a non-empty array of tensors; the model's inputs are: {allowed}")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, Mapping):
            raise OIPError(f"inputs[{i}] must be an object with name, shape, datatype and data, got {_json_type(t)}")
        name = t.get("name")
        if not isinstance(name, str):
            raise OIPError(f"inputs[{i}] has no string 'name'; the model's inputs are: {allowed}")
        spec = by_name.get(name)
        if spec is None:
            raise OIPError(f"unknown input {name!r}; the model's inputs are: {allowed}")
        if name in arrays:
            raise OIPError(f"input {name!r} is given twice")
        arrays[name] = _decode_tensor(t, spec, allow_non_finite=allow_non_finite, max_rows=max_rows, binary=binary)
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise OIPError(f"missing input {missing[0]!r}; the model's inputs are: {allowed}")
    return arrays


def _decode_tensor(
    t: Mapping[str, object], spec: TensorSpecLike, *, allow_non_finite: bool, max_rows: int | None,
    binary: _Binary | None = None,
) -> np.ndarray:
    name = spec.name
    datatype = t.get("datatype")
    if datatype != spec.datatype:
        raise OIPError(f"input {name!r}: datatype {datatype!r} is not allowed; the model expects {spec.datatype!r}")
    shape = _decode_shape(name, t.get("shape"), spec.shape)
    if max_rows is not None and shape and shape[0] > max_rows:
        raise RequestTooLargeError(
            f"input {name!r} has {shape[0]} rows; a request may carry at most {max_rows} (server.max_batch_rows)"
        )
    data = t.get("data")
    size = _binary_size(name, t.get("parameters"))
    if size is not None:
        if data is not None:
            raise OIPError(f"input {name!r} gives both 'data' and parameters.binary_data_size; send its data one way")
        if binary is None:
            raise OIPError(f"input {name!r} gives parameters.binary_data_size but the request has no {HEADER_LENGTH}"
                           " header: a binary body needs it to say where its JSON header ends")
        return _from_binary(name, binary.take(name, size), spec.datatype, shape, allow_non_finite=allow_non_finite)
    if data is None:
        raise OIPError(f"input {name!r}: 'data' is missing")
    dtype = DATATYPES.get(spec.datatype)
    if dtype is None:
        raise OIPError(f"input {name!r}: datatype {spec.datatype!r} cannot be sent as JSON")
    flat = _flatten(name, data, shape)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise OIPError(f"input {name!r}: data has {len(flat)} elements but shape {shape} needs {expected}")
    if spec.datatype == "BYTES":
        return _to_bytes_array(name, flat).reshape(shape)
    return _to_array(name, flat, dtype, spec.datatype, shape, allow_non_finite=allow_non_finite).reshape(shape)


_REQUEST_FIELDS = frozenset({"id", "inputs", "outputs", "parameters"})


def _decode_shape(name: str, shape: object, spec_shape: Sequence[int]) -> list[int]:
    if (isinstance(shape, list) and set(map(type, shape)) <= {int} and len(shape) == len(spec_shape)
            and all(d >= 1 and (s < 0 or d == s) for d, s in zip(shape, spec_shape, strict=True))):
        return shape  # the common case, checked at once; the errors below say what is wrong
    want = "[" + ", ".join("N" if d < 0 else str(d) for d in spec_shape) + "]"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise OIPError(f"input {name!r}: 'shape' must be an array of non-negative integers like {want}")
    if len(shape) != len(spec_shape) or any(s >= 0 and d != s for d, s in zip(shape, spec_shape, strict=True)):
        raise OIPError(f"input {name!r}: shape {shape} does not match the model's shape {want}")
    if 0 in shape:
        raise OIPError(
            f"input {name!r}: shape {shape} has no elements; a request carries at least one row"
            f" (every dimension >= 1, like {want.replace('N', '1')})")
    return shape


def _flatten(name: str, data: object, shape: Sequence[int]) -> list[object]:
    """The elements of ``data`` in row-major order: a flat array (or one scalar) as it is,
    a nested one only when it follows ``shape`` exactly, level by level."""
    if not isinstance(data, list):
        return [data]
    if list not in set(map(type, data)):  # flat (in C: no Python loop per element)
        return data
    level: list[object] = [data]
    for depth, size in enumerate(shape):
        below: list[object] = []
        for k, item in enumerate(level):
            if not isinstance(item, list) or len(item) != size:
                where = "data" + "".join(f"[{i}]" for i in np.unravel_index(k, tuple(shape[:depth]))) if depth else "data"
                got = f"an array of {len(item)}" if isinstance(item, list) else f"{_json_type(item)} {item!r}"[:80]
                raise OIPError(
                    f"input {name!r}: {where} is {got} where shape {list(shape)} needs an array of {size};"
                    " give data flat (row-major) or nested exactly as the shape")
            below.extend(item)
        level = below
    for k, item in enumerate(level):
        if isinstance(item, list):
            raise OIPError(
                f"input {name!r}: data is nested deeper than shape {list(shape)} (element {_where(k, shape)} is an array);"
                " give data flat (row-major) or nested exactly as the shape")
    return level


def _to_bytes_array(name: str, flat: list[object]) -> np.ndarray:
    out = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        if not isinstance(v, str):
            raise OIPError(f"input {name!r}: BYTES data must be strings, found {v!r} at index {i}")
        # surrogatepass keeps an escaped lone surrogate ("\\ud800") as the bytes it stands
        # for, so the consumer (the text front end) reports it as invalid UTF-8 by position.
        out[i] = v.encode("utf-8", "surrogatepass")
    return out


def _bytes_to_json(arr: np.ndarray) -> list[str]:
    return [bytes(v).decode("utf-8", "replace") for v in arr.ravel()]


_FLOAT64_MAX_INT = int(np.finfo(np.float64).max)


def _to_array(
    name: str, flat: list[object], dtype: np.dtype, datatype: str, shape: Sequence[int], *, allow_non_finite: bool
) -> np.ndarray:
    types = set(map(type, flat))  # bool is a type of its own: True is not taken for 1
    if dtype.kind == "b":
        if types - {bool}:
            raise OIPError(f"input {name!r}: {datatype} data must be true/false values")
        return np.array(flat, dtype=dtype)
    if types - {int, float}:
        _refuse_non_numbers(name, flat, datatype)
    if types == {float} and dtype.kind == "f":  # the common case: one conversion, one check
        with np.errstate(over="ignore"):
            arr = np.array(flat, dtype=dtype)
        if np.isfinite(arr).all():
            return arr
        # a non-finite value or one beyond dtype's range: the checks below name it
    if dtype.kind in "iu":
        if float in types:
            bad = next(v for v in flat if not isinstance(v, int))
            raise OIPError(f"input {name!r}: {datatype} data must be integers, found {bad!r}")
        ints: list[int] = flat  # type: ignore[assignment]  # every element is an int (checked above)
        info = np.iinfo(dtype)
        if ints and (min(ints) < info.min or max(ints) > info.max):
            raise OIPError(f"input {name!r}: {datatype} data must lie in [{info.min}, {info.max}]")
        return np.array(flat, dtype=dtype)
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer literal beyond float64, e.g. 10**400
        bad = next(i for i, v in enumerate(flat) if isinstance(v, int) and abs(v) > _FLOAT64_MAX_INT)
        raise OIPError(
            f"input {name!r}: element {_where(bad, shape)} is an integer too large for {datatype}"
        ) from None
    return _to_floats(name, wide, dtype, datatype, shape, allow_non_finite=allow_non_finite)


def _refuse_non_numbers(name: str, flat: list[object], datatype: str) -> None:
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OIPError(f"input {name!r}: {datatype} data must be numbers, found {v!r}")


def _to_floats(
    name: str, wide: np.ndarray, dtype: np.dtype, datatype: str, shape: Sequence[int], *, allow_non_finite: bool
) -> np.ndarray:
    """float64 values as ``dtype``, refusing non-finite ones (unless allowed) and overflow."""
    finite = np.isfinite(wide)
    if not allow_non_finite and not finite.all():
        bad = int(np.argmin(finite))
        raise OIPError(
            f"input {name!r}: element {_where(bad, shape)} is {_number(wide[bad])};"
            f" {datatype} data must be finite numbers"
        )
    with np.errstate(over="ignore"):
        arr = wide.astype(dtype)
    overflow = np.isfinite(arr) | ~finite
    if not overflow.all():
        bad = int(np.argmin(overflow))
        limit = float(np.finfo(dtype).max)
        raise OIPError(
            f"input {name!r}: element {_where(bad, shape)} = {float(wide[bad]):.6g} does not fit in {datatype}"
            f" (largest magnitude {limit:.6g})"
        )
    return arr


def _number(v: object) -> str:
    f = float(v)  # type: ignore[arg-type]
    return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity") if math.isinf(f) else repr(f)


def _where(flat_index: int, shape: Sequence[int]) -> str:
    """``17 (index [0, 17])``: a flat element position and its index in the tensor."""
    index = [int(i) for i in np.unravel_index(flat_index, tuple(shape))] if shape else []
    return f"{flat_index} (index {index})"


# ---------------------------------------------------------------- binary tensor data


class _Binary:
    """The raw bytes after a binary body's JSON header, taken input by input."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, name: str, size: int) -> memoryview:
        left = len(self.data) - self.offset
        if size > left:
            raise OIPError(f"input {name!r}: parameters.binary_data_size is {size} bytes but only {left} bytes of"
                           f" binary data are left after the JSON header ({HEADER_LENGTH}) and the inputs before it")
        part = self.data[self.offset : self.offset + size]
        self.offset += size
        return part

    def check_consumed(self) -> None:
        extra = len(self.data) - self.offset
        if extra:
            raise OIPError(f"{extra} bytes follow the JSON header ({HEADER_LENGTH}) beyond the inputs'"
                           f" parameters.binary_data_size, which add up to {self.offset}; the body must end there")


def _binary_size(name: str, params: object) -> int | None:
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise OIPError(f"input {name!r}: 'parameters' must be an object, got {_json_type(params)}")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OIPError(f"input {name!r}: parameters.binary_data_size must be a number of bytes (an integer >= 0),"
                       f" got {size!r}"[:200])
    return size


def _from_binary(name: str, raw: memoryview, datatype: str, shape: Sequence[int], *, allow_non_finite: bool) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(name, raw, count).reshape(shape)
    dtype = DATATYPES[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise OIPError(f"input {name!r}: parameters.binary_data_size is {len(raw)} bytes but shape {list(shape)} of"
                       f" {datatype} needs {expected} ({count} elements of {dtype.itemsize} bytes)")
    arr = np.frombuffer(raw, dtype)
    if dtype.kind == "b":
        if count and int(arr.view(np.uint8).max()) > 1:
            bad = int(np.argmax(arr.view(np.uint8) > 1))
            raise OIPError(f"input {name!r}: element {_where(bad, shape)} is byte {int(arr.view(np.uint8)[bad])};"
                           " BOOL data is one byte each, 0 or 1")
    elif dtype.kind == "f" and not allow_non_finite:
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise OIPError(f"input {name!r}: element {_where(bad, shape)} is {_number(arr[bad])};"
                           f" {datatype} data must be finite numbers")
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr.reshape(shape)


_LENGTH = struct.Struct("<I")


def _bytes_from_binary(name: str, raw: memoryview, count: int) -> np.ndarray:
    """BYTES elements, each a 4-byte little-endian length and that many bytes."""
    out = np.empty(count, dtype=object)
    offset, end = 0, len(raw)
    for i in range(count):
        if end - offset < 4:
            raise OIPError(f"input {name!r}: binary BYTES data ends before element {i} of {count}"
                           " (each is a 4-byte little-endian length, then the bytes)")
        (n,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if n > end - offset:
            raise OIPError(f"input {name!r}: binary BYTES element {i} says {n} bytes but only {end - offset} are left"
                           " in its parameters.binary_data_size")
        out[i] = bytes(raw[offset : offset + n])
        offset += n
    if offset != end:
        raise OIPError(f"input {name!r}: {end - offset} bytes are left after its {count} BYTES elements;"
                       " parameters.binary_data_size must cover exactly the elements of its shape")
    return out


def _raw(arr: np.ndarray) -> bytes:
    """A numeric (or BOOL) tensor's bytes: little-endian, row-major."""
    return np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()


def _bytes_to_binary(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for v in arr.ravel():
        b = bytes(v) if not isinstance(v, str) else v.encode()
        parts += (_LENGTH.pack(len(b)), b)
    return b"".join(parts)
