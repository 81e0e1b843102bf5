"""Open Inference Protocol (KServe v2 REST) JSON tensors: pure encode/decode functions.

No I/O here: bytes or parsed JSON in, numpy arrays or a JSON-ready dict out,
:class:`OIPError` (an HTTP 400) naming exactly what was wrong otherwise.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

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
    "encode_infer_response",
    "tensor_metadata",
]

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
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            doc = loads_bounded(bytes(body), what="request body")
        except JsonInputError as e:  # invalid, not UTF-8, nested over MAX_JSON_DEPTH, unreadable number
            raise OIPError(str(e)) from None
    else:
        doc = body
    if not isinstance(doc, Mapping):
        raise OIPError(f"request body must be a JSON object, got {_json_type(doc)}")
    unknown = sorted(set(doc) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise OIPError(f"unknown request field {unknown[0]!r}; allowed: id, inputs, outputs, parameters")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OIPError(f"'id' must be a string, got {_json_type(request_id)}")

    adapter, composition = decode_adapter_parameters(doc.get("parameters"))
    arrays = _decode_inputs(doc.get("inputs"), inputs, allow_non_finite=allow_non_finite, max_rows=max_rows)
    wanted = _decode_outputs(doc.get("outputs"), outputs)
    return InferRequest(inputs=arrays, adapter=adapter, id=request_id, outputs=wanted, composition=composition)


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    wanted: Sequence[str] | None,
    adapter: str | None,
    adapter_version: int | None,
    composition: Sequence[Mapping[str, object]] = (),
) -> dict[str, object]:
    """The JSON object of an infer response; ``wanted`` selects and orders outputs.

    :class:`NonFiniteOutputError` when an output holds NaN or infinity (JSON has no such
    numbers), naming the output, the element and the adapter that answered.
    """
    names = list(wanted) if wanted is not None else list(outputs)
    tensors = []
    for name in names:
        arr = np.asarray(outputs[name])
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
        tensors.append({
            "name": name,
            "datatype": datatype,
            "shape": list(arr.shape),
            "data": _bytes_to_json(arr) if datatype == "BYTES" else arr.ravel().tolist(),
        })
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id if request_id is not None else uuid.uuid4().hex,
        "parameters": (
            {"adapters": [dict(c) for c in composition]} if composition
            else {"adapter": adapter, "adapter_version": adapter_version}
        ),
        "outputs": tensors,
    }


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


def _decode_outputs(requested: object, specs: Sequence[TensorSpecLike]) -> tuple[str, ...] | None:
    if requested is None:
        return None
    allowed = [s.name for s in specs]
    if not isinstance(requested, list) or not requested:
        raise OIPError(f"'outputs' must be a non-empty array of {{\"name\": ...}} objects, got {_json_type(requested)}")
    names: list[str] = []
    for i, item in enumerate(requested):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            raise OIPError(f"outputs[{i}] must be an object with a string 'name'")
        if name not in allowed:
            raise OIPError(f"unknown output {name!r}; the model's outputs are: {', '.join(allowed)}")
        if name in names:
            raise OIPError(f"output {name!r} is requested twice")
        names.append(name)
    return tuple(names)


def _decode_inputs(
    tensors: object, specs: Sequence[TensorSpecLike], *, allow_non_finite: bool, max_rows: int | None
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
        arrays[name] = _decode_tensor(t, spec, allow_non_finite=allow_non_finite, max_rows=max_rows)
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise OIPError(f"missing input {missing[0]!r}; the model's inputs are: {allowed}")
    return arrays


def _decode_tensor(
    t: Mapping[str, object], spec: TensorSpecLike, *, allow_non_finite: bool, max_rows: int | None
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


def _decode_shape(name: str, shape: object, spec_shape: Sequence[int]) -> list[int]:
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
    if not any(isinstance(item, list) for item in data):
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
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in flat):
            raise OIPError(f"input {name!r}: {datatype} data must be true/false values")
        return np.array(flat, dtype=dtype)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OIPError(f"input {name!r}: {datatype} data must be numbers, found {v!r}")
    if dtype.kind in "iu":
        ints = [v for v in flat if isinstance(v, int)]
        if len(ints) != len(flat):
            bad = next(v for v in flat if not isinstance(v, int))
            raise OIPError(f"input {name!r}: {datatype} data must be integers, found {bad!r}")
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
