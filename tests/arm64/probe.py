"""What the aarch64 job runs on both architectures: the installed ``lorad``, over HTTP.

Standard library and numpy only, so that it runs in the emulated arm64 chroot against
``pip install .`` exactly as on the host. It starts ``lorad serve --port 0`` on the
embedded demo model in a fresh state directory, sends one fixed batch to the base model
and to each demo adapter, and prints one JSON object: the logits per adapter. The test
(`test_arm64_emulated.py`) compares the two architectures' objects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ADAPTERS = (None, "mirror", "plus-one", "invert")
_START_TIMEOUT_S = 600  # the first start under qemu-user imports onnxruntime slowly


def fixed_batch() -> np.ndarray:
    """Four fixed 8×8 images in 0..1, the same bits on every machine."""
    rng = np.random.default_rng(20261201)
    return rng.random((4, 64), dtype=np.float64).astype(np.float32)


def _request(url: str, doc: dict[str, Any] | None = None) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _start(lorad: str, state: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = open(state.parent / "lorad.log", "wb")
    proc = subprocess.Popen([lorad, "serve", "--port", "0", "--state-dir", str(state)], stdout=log, stderr=subprocess.STDOUT)
    addr = state / "lorad.addr"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if addr.exists():
            doc = json.loads(addr.read_text())
            if doc.get("pid") == proc.pid:
                return proc, doc["url"]
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"lorad did not start:\n{(state.parent / 'lorad.log').read_text(errors='replace')}")
        time.sleep(0.1)


def main() -> None:
    lorad = str(Path(sys.executable).parent / "lorad")
    pixels = fixed_batch()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(lorad, Path(tmp) / "state")
        try:
            logits: dict[str, list[float]] = {}
            for adapter in ADAPTERS:
                doc: dict[str, Any] = {
                    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                                "data": pixels.ravel().tolist()}],
                }
                if adapter is not None:
                    doc["parameters"] = {"adapter": adapter}
                out = _request(f"{url}/v2/models/demo/infer", doc)
                got = {o["name"]: o for o in out["outputs"]}["logits"]
                logits[adapter or "base"] = got["data"]
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
    print(json.dumps({"machine": os.uname().machine, "exit_code": code, "logits": logits}))


if __name__ == "__main__":
    main()
