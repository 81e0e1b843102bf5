"""The KServe v2 binary tensor data extension against a real daemon, spoken by NVIDIA's own
client (``tritonclient[http]`` with ``binary_data=True``) and by hand for what the client
never sends (malformed bodies are in tests/security/test_malformed_requests.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# A test dependency (pyproject's `test` extra, installed by .ci/setup): missing, the suite fails.
import tritonclient.http as httpclient  # type: ignore[import-untyped, unused-ignore]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped, unused-ignore]

from lorad.daemon.demo import demo_adapter_dirs
from tests.integration.lorad_process import MODEL, RunningDaemon, logits_of, start_daemon

ADAPTER = sorted(demo_adapter_dirs())[0]


@pytest.fixture(scope="module")
def client(daemon: RunningDaemon) -> Any:
    return httpclient.InferenceServerClient(daemon.url.removeprefix("http://"))


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(11).random((n, 64), dtype=np.float32)


def _input(pixels: np.ndarray, *, binary: bool = True) -> Any:
    t = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    t.set_data_from_numpy(pixels, binary_data=binary)
    return t


@pytest.mark.parametrize("adapter", [None, ADAPTER])
def test_binary_in_and_out_equal_the_json_answer(daemon: RunningDaemon, client: Any,
                                                 adapter: str | None) -> None:
    pixels = _pixels(3)
    result = client.infer(MODEL, [_input(pixels)], parameters={"adapter": adapter} if adapter else None)
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    assert result.as_numpy("probabilities").shape == (3, 10)
    # The same request as JSON: the same float32 values, bit for bit.
    assert np.array_equal(logits, logits_of(daemon.infer(pixels, adapter)).astype(np.float32))
    response = result.get_response()
    assert response["model_name"] == MODEL and response["parameters"]["adapter"] == adapter
    assert all(o["parameters"]["binary_data_size"] == 3 * 10 * 4 for o in response["outputs"])


def test_outputs_chosen_one_binary_one_json(client: Any) -> None:
    pixels = _pixels(2)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False),
               httpclient.InferRequestedOutput("logits", binary_data=True)]
    result = client.infer(MODEL, [_input(pixels)], outputs=outputs, request_id="req-7")
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert list(by_name) == ["probabilities", "logits"]
    assert "data" in by_name["probabilities"] and "data" not in by_name["logits"]
    probabilities = result.as_numpy("probabilities")
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert result.get_response()["id"] == "req-7"


def test_json_input_binary_output(client: Any) -> None:
    pixels = _pixels(1)
    binary = client.infer(MODEL, [_input(pixels)]).as_numpy("logits")
    mixed = client.infer(MODEL, [_input(pixels, binary=False)]).as_numpy("logits")
    assert np.array_equal(binary, mixed)


def test_client_errors_are_400_with_the_message(client: Any) -> None:
    t = httpclient.InferInput("pixels", [1, 63], "FP32")
    t.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [t])
    assert "shape [1, 63] does not match the model's shape [N, 64]" in str(e.value)
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer(MODEL, [_input(_pixels(1))], parameters={"adapter": "nobody"})


def test_non_finite_input_refused_in_binary_too(client: Any) -> None:
    pixels = _pixels(1)
    pixels[0, 5] = np.inf
    with pytest.raises(InferenceServerException, match=r"element 5 \(index \[0, 5\]\) is Infinity"):
        client.infer(MODEL, [_input(pixels)])


def test_binary_response_headers_by_hand(daemon: RunningDaemon) -> None:
    """What a client that is not tritonclient sees: the header, the content type, the bytes."""
    import urllib.request

    pixels = _pixels(2)
    raw = pixels.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    req = urllib.request.Request(f"{daemon.url}/v2/models/{MODEL}/infer", data=head + raw, method="POST",
                                 headers={"Inference-Header-Content-Length": str(len(head)),
                                          "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=30) as r:
        n = int(r.headers["Inference-Header-Content-Length"])
        body = r.read()
        assert r.headers["Content-Type"].startswith("application/octet-stream")
    doc = json.loads(body[:n])
    assert [o["name"] for o in doc["outputs"]] == ["logits"]
    logits = np.frombuffer(body[n:], "<f4").reshape(2, 10)
    assert np.array_equal(logits, logits_of(daemon.infer(pixels)).astype(np.float32))


def test_large_and_composed_requests_take_the_worker_path(daemon: RunningDaemon, client: Any) -> None:
    """A body over the in-loop size and a composition (built in a worker thread) answer as
    their JSON twins do."""
    pixels = _pixels(200)  # 51 KB of float32: decoded in a worker thread
    big = client.infer(MODEL, [_input(pixels)]).as_numpy("logits")
    assert np.array_equal(big, logits_of(daemon.infer(pixels)).astype(np.float32))
    terms = [{"name": ADAPTER, "weight": 0.5}]
    composed = client.infer(MODEL, [_input(pixels[:2])], parameters={"adapters": terms})
    assert composed.get_response()["parameters"]["adapters"][0]["weight"] == 0.5
    expected = logits_of(daemon.infer(pixels[:2], parameters={"adapters": terms})).astype(np.float32)
    assert np.array_equal(composed.as_numpy("logits"), expected)


def test_binary_without_the_batcher(tmp_path: Path) -> None:
    config = tmp_path / "lorad.yaml"
    config.write_text("server:\n  batching: {enabled: false}\ntrainer:\n  enabled: false\n")
    d = start_daemon(tmp_path / "state", "--config", str(config))
    try:
        c = httpclient.InferenceServerClient(d.url.removeprefix("http://"))
        pixels = _pixels(4)
        for adapter in (None, ADAPTER):
            got = c.infer(MODEL, [_input(pixels)], parameters={"adapter": adapter} if adapter else None)
            assert np.array_equal(got.as_numpy("logits"), logits_of(d.infer(pixels, adapter)).astype(np.float32))
    finally:
        assert d.stop() == 0, d.logs()
