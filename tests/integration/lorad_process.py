"""A real lorad daemon in a subprocess, real HTTP to it, and adapters made with numpy.

Shared by tests/integration and tests/security. No mocks: the daemon is the installed
``lorad`` console script (``python -m lorad.daemon.cli`` when the package is not installed),
bound to a free loopback port (``--port 0``) with its own state directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import dump_peft
from lorad.daemon.ctl.client import multipart_body
from lorad.daemon.demo import demo_model_path

REPO = Path(__file__).resolve().parents[2]
MODEL = "demo"
_START_TIMEOUT_S = 60
_HTTP_TIMEOUT_S = 30


def lorad_command() -> list[str]:
    exe = Path(sys.executable).parent / "lorad"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.cli"]


def loractl_command() -> list[str]:
    exe = Path(sys.executable).parent / "loractl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.ctl"]


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_DEFAULT = object()


@dataclass
class RunningDaemon:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    url: str
    token: str
    log: Path
    unix_socket: str | None = None
    _closed: bool = field(default=False, repr=False)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        body: bytes | None = None,
        content_type: str | None = None,
        token: object = _DEFAULT,
    ) -> Response:
        """One real HTTP request; ``token``: default the daemon's, None for none, or a string."""
        headers = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        tok = self.token if token is _DEFAULT else token
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT_S) as r:
                return Response(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Response(e.code, dict(e.headers), e.read())

    def upload(self, name: str, files: Mapping[str, bytes], *, token: object = _DEFAULT) -> Response:
        body, ctype = multipart_body(files)
        return self.request("PUT", f"/v2/models/{MODEL}/adapters/{name}", body=body, content_type=ctype, token=token)

    def action(self, name: str, action: str, *, token: object = _DEFAULT) -> Response:
        return self.request("POST", f"/v2/models/{MODEL}/adapters/{name}/{action}", token=token)

    def adapters(self) -> dict[str, dict[str, Any]]:
        r = self.request("GET", f"/v2/models/{MODEL}/adapters")
        assert r.status == 200, r.body
        return {a["name"]: a for a in r.json()}

    def infer(self, pixels: np.ndarray, adapter: str | None = None, **extra: object) -> Response:
        doc: dict[str, object] = {
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}],
            **extra,
        }
        if adapter is not None:
            doc["parameters"] = {"adapter": adapter}
        return self.request("POST", f"/v2/models/{MODEL}/infer", json_body=doc)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self._closed:
            return self.proc.returncode
        self._closed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_SERVING = re.compile(r"lorad: serving model '[^']*' at (http://[0-9.:]+)")


def start_daemon(state_dir: Path, *args: str, env: Mapping[str, str] | None = None) -> RunningDaemon:
    """Start ``lorad serve --port 0 --state-dir state_dir ARGS`` and wait until it serves."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    log = state_dir.parent / f"{state_dir.name}.log"
    addr = state_dir / "lorad.addr"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*lorad_command(), "serve", "--port", "0", "--state-dir", str(state_dir), *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if addr.exists():
            doc = json.loads(addr.read_text())
            if doc.get("pid") == proc.pid:
                break
        # On a full disk the address file cannot be written: the log (this process's own)
        # names the URL too.
        served = _SERVING.search(log.read_text(errors="replace"))
        if served is not None:
            doc = {"url": served.group(1), "pid": proc.pid}
            break
        if proc.poll() is not None:
            raise RuntimeError(f"lorad exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"lorad did not start within {_START_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    token = (state_dir / "api-token").read_text().strip()
    return RunningDaemon(proc, state_dir, doc["url"], token, log, doc.get("unix_socket"))


def run_lorad(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lorad_command(), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def run_loractl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*loractl_command(), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------- the demo model in numpy


class DemoMath:
    """The demo MLP's forward pass in numpy, to build adapters with predictable effects."""

    def __init__(self) -> None:
        model = onnx.load(str(demo_model_path()))
        self.w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}

    def hidden(self, pixels: np.ndarray) -> np.ndarray:
        """Input of the head layer (after fc2 and ReLU)."""
        h = np.maximum(pixels.astype(np.float64) @ self.w["fc1.weight"] + self.w["fc1.bias"], 0)
        return np.maximum(h @ self.w["fc2.weight"] + self.w["fc2.bias"], 0)

    def marker_adapter(
        self, probe: np.ndarray, column: int, amount: float, *, fingerprint: str = "", rank: int = 1
    ) -> dict[str, bytes]:
        """PEFT files of an adapter on ``head.weight`` adding ``amount`` to logit ``column`` for ``probe``.

        A = h/|h|² makes ``probe``'s (x·A) exactly 1, so the adapted logits are the base
        logits plus ``amount`` in one column: each (adapter, version) leaves a distinct,
        predictable mark in the output.
        """
        h = self.hidden(probe.reshape(1, -1))[0]
        a = np.zeros((h.size, rank))
        a[:, 0] = h / (h @ h)
        b = np.zeros((rank, self.w["head.weight"].shape[1]))
        b[0, column] = amount
        adapter = LoraAdapter(
            rank=rank, alpha=float(rank), base_fingerprint=fingerprint,
            weights={"head.weight": LoraWeights(A=a.astype(np.float32), B=b.astype(np.float32))},
        )
        return dump_peft(adapter)


def digit_probe() -> np.ndarray:
    """One fixed 8×8 input (scaled 0..1): a crude zero."""
    img = np.zeros((8, 8), np.float32)
    img[1:7, 2] = img[1:7, 5] = 1.0
    img[1, 2:6] = img[6, 2:6] = 1.0
    return img.reshape(1, 64)


def logits_of(response: Response) -> np.ndarray:
    doc = response.json()
    out = {o["name"]: o for o in doc["outputs"]}["logits"]
    return np.asarray(out["data"], np.float64).reshape(out["shape"])


def outputs_differ(a: Sequence[float], b: Sequence[float]) -> bool:
    return not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``pred`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def batcher_counts(daemon: RunningDaemon) -> tuple[float, float]:
    """(ORT calls, requests answered) of the daemon's micro-batcher, from /metrics."""
    text = daemon.request("GET", "/metrics").body.decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line.startswith(("lorad_inference_calls_total", "lorad_batched_requests_total")))
    return float(values["lorad_inference_calls_total"]), float(values["lorad_batched_requests_total"])


def fleet_args(broker: Any) -> list[str]:
    """``loractl fleet`` broker arguments of the fleet user of a tests/conftest.py broker."""
    return list(broker.fleet_args())  # the fleet listener, not the devices' ``broker.port``

