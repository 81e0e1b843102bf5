"""Hostile and broken input over real HTTP: always a 4xx naming what was wrong, never a
500 or a traceback; non-JSON numbers never leave the daemon; no paths for strangers."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lorad.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.lorad_process import MODEL, DemoMath, RunningDaemon, digit_probe, start_daemon

MAX_ROWS = 16
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    root = tmp_path_factory.mktemp("lorad-bad")
    config = root / "lorad.yaml"
    config.write_text(f"server:\n  max_batch_rows: {MAX_ROWS}\n")
    d = start_daemon(root / "state", "--config", str(config))
    yield d
    assert d.stop() == 0, d.logs()


@pytest.fixture(scope="module")
def demo_math() -> DemoMath:
    return DemoMath()


def _raw_infer(daemon: RunningDaemon, data_json: str, shape: list[int] | None = None) -> tuple[int, str]:
    shape_json = json.dumps(shape or [1, 64])
    body = f'{{"inputs": [{{"name": "pixels", "datatype": "FP32", "shape": {shape_json}, "data": [{data_json}]}}]}}'.encode()
    r = daemon.request("POST", INFER, body=body, content_type="application/json", token=None)
    return r.status, r.json()["error"] if r.status >= 400 else ""


@pytest.mark.parametrize(
    ("literal", "shown"),
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e400", "Infinity")],
)
def test_non_finite_data_is_400_naming_tensor_and_index(daemon: RunningDaemon, literal: str, shown: str) -> None:
    values = ["0.5"] * 128
    values[64 + 3] = literal
    status, error = _raw_infer(daemon, ", ".join(values), [2, 64])
    assert status == 400
    assert f"input 'pixels': element 67 (index [1, 3]) is {shown}" in error
    assert "finite" in error


def test_huge_integer_literals_are_400(daemon: RunningDaemon) -> None:
    status, error = _raw_infer(daemon, ", ".join(["1"] * 63 + [str(10**400)]))
    assert status == 400 and "element 63 (index [0, 63]) is an integer too large for FP32" in error
    status, error = _raw_infer(daemon, ", ".join(["1"] * 63 + ["9" * 5000]))
    assert status == 400 and "number" in error
    status, error = _raw_infer(daemon, ", ".join(["1"] * 63 + ["1e39"]))
    assert status == 400 and "does not fit in FP32" in error


def test_non_finite_output_is_a_counted_model_error_not_a_json_nan(daemon: RunningDaemon) -> None:
    # Finite input whose logits overflow float32: the model itself answers infinity/NaN.
    status, error = _raw_infer(daemon, ", ".join(["3e38"] * 64))
    assert status == 500
    assert re.search(r"the model answered (NaN|-?Infinity) in output '\w+' element \d+", error), error
    assert "with the base model" in error
    metrics = daemon.request("GET", "/metrics").body.decode()
    assert 'lorad_model_output_errors_total{adapter_kind="base"} 1.0' in metrics


def test_rows_beyond_max_batch_rows_are_413_naming_the_limit(daemon: RunningDaemon) -> None:
    status, error = _raw_infer(daemon, ", ".join(["0.5"] * 64 * (MAX_ROWS + 1)), [MAX_ROWS + 1, 64])
    assert status == 413 and f"at most {MAX_ROWS} (server.max_batch_rows)" in error
    assert daemon.infer(np.full((MAX_ROWS, 64), 0.5, np.float32)).status == 200


def test_large_bodies_are_413_before_decoding(daemon: RunningDaemon) -> None:
    # Far more than 16 rows can take, announced by Content-Length: refused unread.
    body = b'{"inputs": [' + b" " * (4 << 20) + b"]}"
    r = daemon.request("POST", INFER, body=body, content_type="application/json", token=None)
    assert r.status == 413
    error = r.json()["error"]
    assert "server.max_batch_rows = 16 rows of 64 numbers" in error and "exceeds the limit of" in error


def test_deep_nesting_in_a_rollback_body_is_400(daemon: RunningDaemon) -> None:
    body = b"[" * 2000 + b"]" * 2000
    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/mirror/rollback", body=body, content_type="application/json")
    assert r.status == 400 and '{"version": N}' in r.json()["error"] and "nested too deeply" in r.json()["error"]
    body = b"[" * 100_000 + b"]" * 100_000  # past the 4096 bytes a rollback body may take: refused unread
    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/mirror/rollback", body=body, content_type="application/json")
    assert r.status == 413 and "exceeds the limit of 4096 bytes (fixed)" in r.json()["error"]


def _multipart(part_headers: bytes, content: bytes = b"{}") -> tuple[bytes, str]:
    boundary = "lorad-test-boundary"
    body = (
        f"--{boundary}\r\n".encode() + part_headers + b"\r\n\r\n" + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "headers",
    [
        b'Content-Disposition: form-data; name="adapter_config.json"\x01; filename="adapter_config.json"',
        b'Content-Disposition: form-data; name="adapter_config.json"\r\nX-Pad: ' + b"a" * 9000,
    ],
    ids=["control-char", "over-8KB"],
)
def test_bad_multipart_part_headers_are_400(daemon: RunningDaemon, headers: bytes) -> None:
    body, ctype = _multipart(headers)
    r = daemon.request("PUT", f"/v2/models/{MODEL}/adapters/x", body=body, content_type=ctype)
    assert r.status == 400, r.body
    assert "malformed multipart body" in r.json()["error"]


def _deep_safetensors() -> bytes:
    header = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({CONFIG_FILE: b'{"r": 1, "lora_alpha": 1e38, "peft_type": "LORA"}'}, 422, "magnitude"),
        ({CONFIG_FILE: b'{"r": 1, "lora_alpha": -2, "peft_type": "LORA"}'}, 422, "'lora_alpha' must be a finite number > 0"),
        ({CONFIG_FILE: b'{"r": 1, "lora_alpha": 0, "peft_type": "LORA"}'}, 422, "'lora_alpha' must be a finite number > 0"),
        ({CONFIG_FILE: b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"}, 422, "nested too deeply"),
        ({WEIGHTS_FILE: _deep_safetensors()}, 422, "nested too deeply"),
    ],
    ids=["alpha-1e38", "alpha-negative", "alpha-zero", "config-nesting", "header-nesting"],
)
def test_bad_adapter_numbers_and_nesting_are_refused(
    daemon: RunningDaemon, demo_math: DemoMath, change: dict[str, bytes], status: int, fragment: str
) -> None:
    files = {**demo_math.marker_adapter(digit_probe(), 3, 2.0), **change}
    r = daemon.upload("numbers", files)
    assert r.status == status, r.body
    assert fragment in r.json()["error"]
    assert "numbers" not in daemon.adapters()


def test_an_example_without_inputs_is_400(daemon: RunningDaemon) -> None:
    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/mirror/examples", json_body={"label": 3})
    assert r.status == 400 and '{"inputs": [' in r.json()["error"]


def test_a_file_corrupted_on_disk_does_not_leak_its_path(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    r = daemon.upload("rot", demo_math.marker_adapter(digit_probe(), 2, 1.0))
    assert r.status == 201, r.body
    version = r.json()["version"]
    stored = daemon.state_dir / "adapters" / "rot" / str(version) / WEIGHTS_FILE
    stored.write_bytes(stored.read_bytes()[:-8] + b"\xff" * 8)
    root = str(Path(daemon.state_dir).resolve())
    anonymous = daemon.request("POST", INFER, json_body=_body("rot"), token=None)
    assert anonymous.status == 409  # damaged: refused, never served, never a 500
    assert root not in anonymous.body.decode() and "/" not in anonymous.json()["error"]
    assert "daemon log" in anonymous.json()["error"] and "is damaged" in anonymous.json()["error"]
    operator = daemon.request("POST", INFER, json_body=_body("rot"))
    assert operator.status == 409 and "is corrupt" in operator.json()["error"]
    assert "is corrupt" in daemon.logs()
    listed = {a["name"]: a for a in daemon.request("GET", f"/v2/models/{MODEL}/adapters", token=None).json()}
    assert listed["rot"]["state"] == "damaged" and "reason" not in listed["rot"]


def _body(adapter: str) -> dict[str, object]:
    return {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": digit_probe().ravel().tolist()}],
        "parameters": {"adapter": adapter},
    }
