"""Every malformed request is a 4xx with a JSON message, refused at the earliest layer, over
real HTTP to a real daemon: HTTP framing (the parser's own refusals, ``Expect:
100-continue`` over a limit), JSON depth, tensor shape/data agreement, query parameters,
safetensors layout; and property tests (hypothesis) that generate malformed tensors,
bodies and safetensors files and check for a 4xx JSON error and an unchanged store."""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.adapters.bounded_json import MAX_JSON_DEPTH
from lorad.adapters.peft_format import CONFIG_FILE, MAX_HEADER_BYTES, WEIGHTS_FILE
from tests.integration.lorad_process import MODEL, DemoMath, Response, RunningDaemon, digit_probe, start_daemon

MAX_ROWS = 16
ROW = 64  # the demo model's pixels per row
INFER = f"/v2/models/{MODEL}/infer"
EXAMPLES = f"/v2/models/{MODEL}/adapters/prop/examples"
_SOCKET_TIMEOUT_S = 30  # a safety net for a daemon that never answers, not a synchronisation


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    root = tmp_path_factory.mktemp("lorad-malformed")
    config = root / "lorad.yaml"
    config.write_text(f"server:\n  max_batch_rows: {MAX_ROWS}\ntrainer:\n  schedule: false\n")
    d = start_daemon(root / "state", "--config", str(config))
    yield d
    assert d.stop() == 0, d.logs()
    assert "Traceback" not in d.logs(), d.logs()  # client mistakes are answered, not logged as crashes


@pytest.fixture(scope="module")
def demo_math() -> DemoMath:
    return DemoMath()


# ---------------------------------------------------------------- raw HTTP


def _connect(daemon: RunningDaemon) -> socket.socket:
    host, port = daemon.url.rsplit("/", 1)[-1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=_SOCKET_TIMEOUT_S)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-cased headers, body by Content-Length) from ``sock``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response; got {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(body) < size:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        body += chunk
    return status, headers, body[:size]


def _raw(daemon: RunningDaemon, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with _connect(daemon) as sock:
        sock.sendall(data)
        return _read_response(sock)


def _json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


_POST_INFER = f"POST {INFER} HTTP/1.1\r\nHost: lorad\r\n".encode()


@pytest.mark.parametrize(
    ("request_bytes", "fragment"),
    [
        (b"GARBAGE\r\n\r\n", "Invalid method"),
        (b"GET /v2 HTTP/9.9\r\nHost: lorad\r\n\r\n", "Invalid HTTP version"),
        (b"GET /v2 HTTP/1.1\r\nHost: lorad\r\nX-Bad: a\x01b\r\n\r\n", "Invalid header value char"),
        (b"GET /v2 HTTP/1.1\r\nHost: lorad\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", "Got more than 8190 bytes"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: lorad\r\n\r\n", "Got more than 8190 bytes"),
        (_POST_INFER + b"Content-Length: abc\r\n\r\n", "Content-Length"),
        (_POST_INFER + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Duplicate Content-Length"),
        (_POST_INFER + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", "Transfer-Encoding"),
        (_POST_INFER + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "chunk size"),
    ],
    ids=["request-line", "http-version", "header-control-char", "header-over-8KiB", "url-over-8KiB",
         "content-length-not-a-number", "two-content-lengths", "chunked-and-content-length", "bad-chunk-size"],
)
def test_http_parser_refusals_are_json_400(daemon: RunningDaemon, request_bytes: bytes, fragment: str) -> None:
    status, headers, body = _raw(daemon, request_bytes)
    assert status == 400, body
    error = _json_error(status, headers, body)
    assert error.startswith("malformed HTTP request: ") and fragment in error, error


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (INFER, "server.max_batch_rows = 16 rows of 64 numbers"),
        (f"/v2/models/{MODEL}/adapters/big", "server.max_request_bytes"),
        (EXAMPLES, "trainer.store.max_example_bytes"),
        (f"/v2/models/{MODEL}/adapters/prop/privacy/audit", "audit request"),
        (f"/v2/models/{MODEL}/adapters/prop/rollback", "(fixed)"),
    ],
    ids=["infer", "upload", "example", "audit", "rollback"],
)
def test_expect_100_continue_over_the_limit_is_413_without_continue(daemon: RunningDaemon, path: str, fragment: str) -> None:
    method = "PUT" if path.endswith("/big") else "POST"
    head = (f"{method} {path} HTTP/1.1\r\nHost: lorad\r\nAuthorization: Bearer {daemon.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 2000000000\r\nExpect: 100-continue\r\n\r\n").encode()
    with _connect(daemon) as sock:
        sock.sendall(head)
        status, headers, body = _read_response(sock)  # the first answer: no "100 Continue" before it
    assert status == 413, body
    error = _json_error(status, headers, body)
    assert "of 2000000000 bytes exceeds the limit" in error and fragment in error and "not sending 100 Continue" in error


def test_expect_100_continue_within_the_limit_continues_and_is_answered(daemon: RunningDaemon) -> None:
    doc = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, ROW], "data": [0.5] * ROW}]}).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: lorad\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(doc)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with _connect(daemon) as sock:
        sock.sendall(head)
        assert _read_response(sock)[0] == 100
        sock.sendall(doc)
        status, _, body = _read_response(sock)
    assert status == 200, body
    assert json.loads(body)["outputs"]


def test_an_unknown_expectation_is_417(daemon: RunningDaemon) -> None:
    status, headers, body = _raw(daemon, _POST_INFER + b"Content-Length: 2\r\nExpect: something-else\r\n\r\n{}")
    assert status == 417
    assert "Expect: 'something-else' is not supported" in _json_error(status, headers, body)


# ---------------------------------------------------------------- JSON depth, tensors, queries


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 1000, 2000])  # 2000: 4000 bytes, within every route's limit
@pytest.mark.parametrize("route", ["audit", "examples", "infer", "rollback"])
def test_json_nested_past_the_limit_is_400_naming_it_on_every_route(daemon: RunningDaemon, route: str, depth: int) -> None:
    path = {"audit": f"/v2/models/{MODEL}/adapters/prop/privacy/audit", "examples": EXAMPLES, "infer": INFER,
            "rollback": f"/v2/models/{MODEL}/adapters/mirror/rollback"}[route]
    body = b"[" * depth + b"]" * depth
    r = daemon.request("POST", path, body=body, content_type="application/json")
    assert r.status == 400, r.body
    assert f"nested too deeply: arrays and objects may nest at most {MAX_JSON_DEPTH} levels" in r.json()["error"]


def _infer_body(tensor: dict[str, object], **extra: object) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def test_ragged_data_is_400_naming_the_tensor_and_the_row(daemon: RunningDaemon) -> None:
    rows = [[0.5] * ROW, [0.5] * (ROW - 1)]
    r = daemon.request("POST", INFER, body=_infer_body({"name": "pixels", "datatype": "FP32", "shape": [2, ROW], "data": rows}),
                       content_type="application/json")
    assert r.status == 400
    assert "input 'pixels': data[1] is an array of 63 where shape [2, 64] needs an array of 64" in r.json()["error"]


def test_a_tensor_without_rows_is_400(daemon: RunningDaemon) -> None:
    r = daemon.request("POST", INFER, body=_infer_body({"name": "pixels", "datatype": "FP32", "shape": [0, ROW], "data": []}),
                       content_type="application/json")
    assert r.status == 400
    assert "input 'pixels': shape [0, 64] has no elements; a request carries at least one row" in r.json()["error"]


@pytest.mark.parametrize("version", ["١", "²", "1.0", "-1", "0", "1" * 40, " 1", "0x1"])
def test_version_query_takes_ascii_digits_only(daemon: RunningDaemon, version: str) -> None:
    from urllib.parse import quote

    r = daemon.request("GET", f"/v2/models/{MODEL}/adapters/mirror/files?version={quote(version)}")
    assert r.status == 400, r.body
    assert f"query parameter version={version!r}" in r.json()["error"]
    assert daemon.request("GET", f"/v2/models/{MODEL}/adapters/mirror/files?version=1").status == 200


# ---------------------------------------------------------------- properties (hypothesis)

_PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
_FINITE = st.floats(-1e3, 1e3, allow_nan=False)
_JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def _ragged(draw: st.DrawFn) -> dict[str, object]:
    rows = draw(st.integers(1, 4))
    data: list[object] = [[0.5] * ROW for _ in range(rows)]
    bad = draw(st.integers(0, rows - 1))
    data[bad] = draw(st.one_of(st.lists(_FINITE, max_size=2 * ROW).filter(lambda r: len(r) != ROW), _FINITE, _JUNK))
    return {"name": "pixels", "datatype": "FP32", "shape": [rows, ROW], "data": data}


@st.composite
def _wrong_count(draw: st.DrawFn) -> dict[str, object]:
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(0, 5 * ROW).filter(lambda n: n != rows * ROW))
    return {"name": "pixels", "datatype": "FP32", "shape": [rows, ROW], "data": [0.5] * n}


@st.composite
def _bad_element(draw: st.DrawFn) -> dict[str, object]:
    data: list[object] = [0.5] * ROW
    data[draw(st.integers(0, ROW - 1))] = draw(st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e300, 10**400]), _JUNK))
    return {"name": "pixels", "datatype": "FP32", "shape": [1, ROW], "data": data}


@st.composite
def _deep(draw: st.DrawFn) -> dict[str, object]:
    data: object = 0.5
    for _ in range(draw(st.integers(MAX_JSON_DEPTH, 3 * MAX_JSON_DEPTH))):
        data = [data]
    return {"name": "pixels", "datatype": "FP32", "shape": [1, ROW], "data": data}


_SHAPES = st.one_of(
    st.lists(st.integers(-3, 70), max_size=4).filter(lambda s: s != [1, ROW]),
    st.just([0, ROW]), st.lists(st.floats(allow_nan=False), min_size=1, max_size=2), _JUNK,
)
_DATATYPES = st.one_of(st.sampled_from(["FP16", "FP64", "INT64", "BYTES", "BOOL", "fp32", ""]), _JUNK)
_NAMES = st.one_of(st.sampled_from(["pixel", "PIXELS", "", "logits"]), _JUNK)

#: A tensor that is wrong in one way (each branch can never produce a valid one).
MALFORMED_TENSORS = st.one_of(
    _ragged(), _wrong_count(), _bad_element(), _deep(),
    st.builds(lambda s: {"name": "pixels", "datatype": "FP32", "shape": s, "data": [0.5] * ROW}, _SHAPES),
    st.builds(lambda d: {"name": "pixels", "datatype": d, "shape": [1, ROW], "data": [0.5] * ROW}, _DATATYPES),
    st.builds(lambda n: {"name": n, "datatype": "FP32", "shape": [1, ROW], "data": [0.5] * ROW}, _NAMES),
    st.builds(lambda d: {"name": "pixels", "datatype": "FP32", "shape": [1, ROW], "data": d}, st.one_of(st.none(), st.just([]))),
)


def _assert_4xx_json(r: Any) -> None:
    assert 400 <= r.status < 500, (r.status, r.body[:500])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error, str) and error


def _send(daemon: RunningDaemon, path: str, body: bytes) -> Any:
    return daemon.request("POST", path, body=body, content_type="application/json")


@_PROPERTY
@given(tensor=MALFORMED_TENSORS)
def test_property_malformed_tensors_to_infer_are_4xx(daemon: RunningDaemon, tensor: dict[str, object]) -> None:
    before = daemon.adapters()
    _assert_4xx_json(_send(daemon, INFER, _infer_body(tensor)))
    assert daemon.adapters() == before


@_PROPERTY
@given(body=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4)),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=10).map(lambda doc: json.dumps(doc).encode()),
))
def test_property_arbitrary_bodies_to_infer_and_examples_are_4xx(daemon: RunningDaemon, body: bytes) -> None:
    for path in (INFER, EXAMPLES):
        _assert_4xx_json(_send(daemon, path, body))
    assert _example_count(daemon) == 0


_BAD_LABELS = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=10), st.text(max_size=5), st.booleans(), st.none(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(lambda a, b: [[0.5] * a, [0.5] * b], st.integers(0, 3), st.integers(0, 3)).filter(lambda v: len(v[0]) != len(v[1])),
)


def _example_count(daemon: RunningDaemon) -> int:
    r = daemon.request("GET", EXAMPLES)
    assert r.status == 200, r.body
    return int(r.json()["examples"])


@_PROPERTY
@given(example=st.one_of(
    st.builds(lambda t: {"inputs": [t], "label": 3}, MALFORMED_TENSORS),
    st.builds(lambda label: {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, ROW], "data": [0.5] * ROW}],
                             "label": label}, _BAD_LABELS),
))
def test_property_malformed_examples_are_4xx_and_store_nothing(daemon: RunningDaemon, example: dict[str, object]) -> None:
    _assert_4xx_json(_send(daemon, EXAMPLES, json.dumps(example).encode()))
    assert _example_count(daemon) == 0


# -- malformed safetensors uploads


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _join(header: object, data: bytes, *, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def _tensors(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


@st.composite
def _malformed_safetensors(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` (a valid adapter file) broken in one way that no file can survive."""
    header, data = _split(raw)
    (size,) = struct.unpack("<Q", raw[:8])
    names = _tensors(header)
    key = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["declared-size", "header-cut", "offsets", "shape", "dtype", "truncate", "extend",
                                 "metadata", "duplicate", "random-header", "deep-header", "not-a-header"]))
    entry = dict(header[key])
    if kind == "declared-size":  # past the end of the file, or past lorad's bound
        declared = draw(st.one_of(st.integers(len(raw) - 7, 2**64 - 1), st.just(MAX_HEADER_BYTES + 1)))
        return struct.pack("<Q", declared) + raw[8:]
    if kind == "header-cut":  # shorter than the JSON: corrupt JSON, or data that no longer adds up
        return struct.pack("<Q", size - draw(st.integers(1, size))) + raw[8:]
    if kind == "offsets":
        shift = draw(st.integers(-64, 64).filter(lambda d: d != 0))
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[begin + shift, end + shift], [begin, end + shift],
                                                      [max(0, begin + shift), end]]))
        if entry["data_offsets"] == [begin, end]:
            entry["data_offsets"] = [begin, end + 4]
    elif kind == "shape":
        dim = draw(st.integers(0, len(entry["shape"]) - 1))
        entry["shape"] = list(entry["shape"])
        entry["shape"][dim] += draw(st.integers(-entry["shape"][dim], 8).filter(lambda d: d != 0))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "F64", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "Q4", ""]))
    elif kind == "truncate":
        return raw[: -draw(st.integers(1, len(data)))]
    elif kind == "extend":
        return raw + bytes(draw(st.integers(1, 64)))
    elif kind == "metadata":
        header = {**header, "__metadata__": {**header.get("__metadata__", {}), "x": draw(st.one_of(st.integers(), _JUNK.filter(
            lambda v: not isinstance(v, str))))}}
        return _join(header, data)
    elif kind == "duplicate":  # another name for the same bytes: overlapping tensors
        return _join({**header, key + ".copy": entry}, data)
    elif kind == "random-header":
        value = draw(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=4)),
                                  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                               max_size=3), max_leaves=8))
        return _join(value, data)
    elif kind == "deep-header":
        depth = draw(st.integers(MAX_JSON_DEPTH, 4 * MAX_JSON_DEPTH))
        return _join({"__metadata__": {}, "x": json.loads("[" * depth + "]" * depth)}, data)
    else:
        return draw(st.binary(max_size=64))
    return _join({**header, key: entry}, data)


def test_property_malformed_safetensors_uploads_are_4xx_and_store_nothing(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    files = demo_math.marker_adapter(digit_probe(), 3, 2.0)
    assert daemon.upload("prop-ok", files).status == 201  # the unbroken files are accepted
    before = daemon.adapters()
    store = daemon.state_dir / "adapters" / "prop-bad"

    @_PROPERTY
    @given(weights=_malformed_safetensors(files[WEIGHTS_FILE]))
    def upload(weights: bytes) -> None:
        r = daemon.upload("prop-bad", {**files, WEIGHTS_FILE: weights})
        _assert_4xx_json(r)
        assert daemon.adapters() == before
        assert not store.exists() or not any(store.iterdir())

    upload()


@_PROPERTY
@given(config=st.one_of(
    st.binary(max_size=100).filter(lambda b: not b.strip().startswith(b"{")),
    st.integers(MAX_JSON_DEPTH, 4 * MAX_JSON_DEPTH).map(lambda d: b'{"r": ' + b"[" * d + b"]" * d + b"}"),
    st.sampled_from([b"[]", b"null", b'{"r": 0}', b'{"r": -1}', b'{"r": true}', b'{"r": 1, "lora_alpha": 0}',
                     b'{"r": 1, "peft_type": "IA3"}', b'{"r": 1, "use_dora": true}', b'{"r": 2}']),
))
def test_property_malformed_configs_are_4xx_and_store_nothing(daemon: RunningDaemon, demo_math: DemoMath, config: bytes) -> None:
    files = demo_math.marker_adapter(digit_probe(), 3, 2.0)
    before = daemon.adapters()
    r = daemon.upload("prop-config", {**files, CONFIG_FILE: config})
    _assert_4xx_json(r)
    assert daemon.adapters() == before


# ---------------------------------------------------------------- binary tensor data extension


def _binary_infer(daemon: RunningDaemon, head: object, raw: bytes, header: str | None) -> tuple[int, dict[str, str], bytes]:
    """POST an infer body of JSON ``head`` and ``raw`` bytes, with ``header`` as its
    Inference-Header-Content-Length ("len" for the JSON's true length)."""
    head_bytes = json.dumps(head).encode() if not isinstance(head, bytes) else head
    body = head_bytes + raw
    extra = b""
    if header is not None:
        value = str(len(head_bytes)) if header == "len" else header
        extra = f"Inference-Header-Content-Length: {value}\r\n".encode()
    return _raw(daemon, _POST_INFER + f"Content-Length: {len(body)}\r\n".encode() + extra
                + b"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n" + body)


def _pixels_head(size: object, shape: object = (1, ROW), **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(shape),  # type: ignore[call-overload]
                        "parameters": {"binary_data_size": size}, **extra}]}


_ROW_BYTES = struct.pack(f"<{ROW}f", *([0.5] * ROW))


@pytest.mark.parametrize("head, raw, header, fragment", [
    # the header's length is wrong: past the body, cutting the JSON, not a number, zero
    (_pixels_head(4 * ROW), _ROW_BYTES, "100000", "but the whole request body is"),
    (_pixels_head(4 * ROW), _ROW_BYTES, "20", "not valid JSON"),
    (_pixels_head(4 * ROW), _ROW_BYTES, "-5", "is not a length in bytes"),
    (_pixels_head(4 * ROW), _ROW_BYTES, "0x10", "is not a length in bytes"),
    (_pixels_head(4 * ROW), _ROW_BYTES, "0", "must start with the JSON header"),
    # sizes that do not match shape × datatype, or the bytes that follow
    (_pixels_head(4 * ROW - 4), _ROW_BYTES[:-4], "len", f"shape [1, {ROW}] of FP32 needs {4 * ROW}"),
    (_pixels_head(8 * ROW, (2, ROW)), _ROW_BYTES, "len", "only 256 bytes of binary data are left"),
    (_pixels_head(4 * ROW), _ROW_BYTES + b"\0" * 3, "len", "3 bytes follow the JSON header"),
    (_pixels_head(-1), _ROW_BYTES, "len", "binary_data_size must be a number of bytes"),
    (_pixels_head("256"), _ROW_BYTES, "len", "binary_data_size must be a number of bytes"),
    (_pixels_head(1 << 62), _ROW_BYTES, "len", "binary data are left"),
    # binary_data_size on a JSON-only body, and the bytes without the header
    (_pixels_head(4 * ROW), b"", None, "has no Inference-Header-Content-Length header"),
    (_pixels_head(4 * ROW), _ROW_BYTES, None, "needs the Inference-Header-Content-Length header"),
    (_pixels_head(4 * ROW, data=[0.5] * ROW), _ROW_BYTES, "len", "gives both 'data' and parameters.binary_data_size"),
    # non-finite floats and too many rows are refused as in JSON
    (_pixels_head(4 * ROW), struct.pack(f"<{ROW}f", *([0.5] * (ROW - 1) + [math.nan])), "len", "is NaN"),
    (_pixels_head(4 * ROW * (MAX_ROWS + 1), (MAX_ROWS + 1, ROW)), _ROW_BYTES * (MAX_ROWS + 1), "len", "server.max_batch_rows"),
    # outputs asked for in a way the extension does not have
    ({**_pixels_head(4 * ROW), "parameters": {"binary_data_output": "yes"}}, _ROW_BYTES, "len", "must be true or false"),
    ({**_pixels_head(4 * ROW), "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}, _ROW_BYTES, "len",
     "classification is not supported"),
], ids=["past-body", "cuts-json", "negative", "hex", "zero", "size-short-of-shape", "size-past-data", "bytes-left-over",
        "negative-size", "string-size", "huge-size", "size-without-header", "bytes-without-header", "data-and-size", "nan",
        "too-many-rows", "output-flag-not-bool", "classification"])
def test_malformed_binary_bodies_are_4xx_naming_what(daemon: RunningDaemon, head: object, raw: bytes, header: str | None,
                                                     fragment: str) -> None:
    status, headers, body = _binary_infer(daemon, head, raw, header)
    assert 400 <= status < 500, (status, body[:300])
    assert fragment in _json_error(status, headers, body), body


def test_a_well_formed_binary_body_is_answered(daemon: RunningDaemon) -> None:
    status, headers, body = _binary_infer(daemon, {**_pixels_head(4 * ROW), "parameters": {"binary_data_output": True}},
                                          _ROW_BYTES, "len")
    assert status == 200, body[:300]
    n = int(headers["inference-header-content-length"])
    doc = json.loads(body[:n])
    assert sum(o["parameters"]["binary_data_size"] for o in doc["outputs"]) == len(body) - n == 2 * 10 * 4


@_PROPERTY
@given(head=st.binary(max_size=200), raw=st.binary(max_size=300), header=st.one_of(
    st.none(), st.integers(-5, 600).map(str), st.text(max_size=6).filter(lambda s: "\r" not in s and "\n" not in s)))
def test_property_arbitrary_binary_bodies_are_4xx(daemon: RunningDaemon, head: bytes, raw: bytes, header: str | None) -> None:
    head_value = header.encode("latin-1", "replace").decode("latin-1") if header is not None else None
    r = daemon.request("POST", INFER, body=head + raw, content_type="application/octet-stream") if head_value is None \
        else _raw_request(daemon, head + raw, head_value)
    _assert_4xx_json(r)


def _raw_request(daemon: RunningDaemon, body: bytes, header: str) -> Any:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(daemon.url + INFER, data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream",
                                          "Inference-Header-Content-Length": header})
    try:
        with urllib.request.urlopen(req, timeout=_SOCKET_TIMEOUT_S) as r:
            return Response(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        with e:
            return Response(e.code, dict(e.headers), e.read())
