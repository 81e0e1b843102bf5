"""What the aarch64 job runs on both architectures: the installed ``lorad``, over HTTP.

Standard library and numpy only, so that it runs in the emulated arm64 chroot against
``pip install .`` exactly as on the host. It starts ``lorad serve --port 0`` on the
embedded demo model in a fresh state directory, sends one fixed batch to the base model
and to each demo adapter, trains one adapter with DP-SGD on the portable backend (seeded
noise and sampling, so that both machines draw the same batches and the same noise), and
prints one JSON object: the logits per adapter. Then the same on the demo model quantised
to int8 and to int4 (tests/data/quantised, made by ``lorad quantize-model``): with
``quantized_compute: fp32`` (exact products, comparable to 1e-4) the base model and a DP run
trained through the quantised weights; with ``int8`` (the default: activations quantised
per block, where a last-bit difference between two CPUs can move a code by one) the base
model. The test (`test_emulated_arm64.py`) compares the two architectures' objects.
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
#: The quantised demo models (a base of their own: the demo adapters, made for the fp32
#: model, are refused there, so only the base and a trained adapter are probed).
QUANTISED = {q: Path(__file__).resolve().parents[1] / "data" / "quantised" / f"demo_{q}.onnx" for q in ("int8", "int4")}
TRAINED = "plus-one-dp"
N_EXAMPLES = 200
# Seeded noise and sampling are a test-only mode (trainer.testing); the run is small
# because every step is emulated. SGD, because AdamW divides by the root of tiny second
# moments and so magnifies the last-bit differences of two CPUs' kernels (1.9e-3 in the
# logits after 30 steps here, against 1.1e-5 with SGD).
CONFIG = f"""
trainer:
  enabled: true
  schedule: false
  testing: true
  noise: seeded
  noise_seed: 11
  backend: portable
  adapters:
    {TRAINED}:
      target_epsilon: 50
      clip_norm: 1.0
      batch_size: 32
      steps: 30
      optimizer: sgd
      learning_rate: 0.5
      rank: 4
      alpha: 8
"""
_START_TIMEOUT_S = 600  # the first start under qemu-user imports onnxruntime slowly


def fixed_batch() -> np.ndarray:
    """Four fixed 8×8 images in 0..1, the same bits on every machine."""
    rng = np.random.default_rng(20261201)
    return rng.random((4, 64), dtype=np.float64).astype(np.float32)


def _request(url: str, doc: dict[str, Any] | None = None, *, token: str | None = None, method: str | None = None) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _start(lorad: str, state: Path, model: Path | None = None,
           compute: str = "int8") -> tuple[subprocess.Popen[bytes], str]:
    log = open(state.parent / "lorad.log", "wb")  # noqa: SIM115 - the daemon child writes it while it runs
    config = state.parent / "lorad.yaml"
    # The demo's name, targets and slot rank, on the quantised file.
    section = "" if model is None else (f"model: {{name: demo, path: {model}, targets: [fc1, fc2, head], rank: 8, "
                                        f"quantized_compute: {compute}}}\n")
    config.write_text(section + CONFIG)
    proc = subprocess.Popen([lorad, "serve", "--config", str(config), "--port", "0", "--state-dir", str(state)],
                            stdout=log, stderr=subprocess.STDOUT)
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


def _tensor(pixels: np.ndarray) -> dict[str, Any]:
    return {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}


def _logits(url: str, pixels: np.ndarray, adapter: str | None) -> list[float]:
    doc: dict[str, Any] = {"inputs": [_tensor(pixels)]}
    if adapter is not None:
        doc["parameters"] = {"adapter": adapter}
    out = _request(f"{url}/v2/models/demo/infer", doc)
    data: list[float] = {o["name"]: o for o in out["outputs"]}["logits"]["data"]
    return data


def _train(url: str, token: str) -> dict[str, Any]:
    """Teach ``(base answer + 1) mod 10`` from examples labelled by the base model itself."""
    rng = np.random.default_rng(7)
    pixels = rng.random((N_EXAMPLES, 64)).astype(np.float32)
    base = np.asarray(_logits(url, pixels, None)).reshape(N_EXAMPLES, -1)
    labels = (base.argmax(axis=1) + 1) % 10
    a = f"{url}/v2/models/demo/adapters/{TRAINED}"
    for row, label in zip(pixels, labels, strict=True):
        _request(f"{a}/examples", {"inputs": [_tensor(row[None])], "label": int(label)}, token=token)
    _request(f"{a}/train", {}, token=token, method="POST")
    deadline = time.monotonic() + 1800
    while True:
        status: dict[str, Any] = _request(f"{a}/train")
        if status["state"] == "finished":
            return status
        if time.monotonic() > deadline:
            raise SystemExit(f"training did not finish: {status}")
        time.sleep(0.5)


def _probe(lorad: str, pixels: np.ndarray, model: Path | None, adapters: tuple[str | None, ...], *,
           compute: str = "int8", train: bool = True) -> dict[str, Any]:
    """Serve ``model`` (the embedded demo when None): logits of ``adapters``, then (``train``)
    a DP run and its version's logits; the daemon's exit code."""
    run = None
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        proc, url = _start(lorad, state, model, compute)
        try:
            logits = {adapter or "base": _logits(url, pixels, adapter) for adapter in adapters}
            if train:
                run = _train(url, (state / "api-token").read_text().strip())
                logits[TRAINED] = _logits(url, pixels, TRAINED)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
    return {"exit_code": code, "run": run, "logits": logits}


def main() -> None:
    lorad = str(Path(sys.executable).parent / "lorad")
    pixels = fixed_batch()
    out = _probe(lorad, pixels, None, ADAPTERS)
    out["quantised"] = {q: _probe(lorad, pixels, path, (None,), compute="fp32") for q, path in QUANTISED.items()}
    out["quantised_int8_compute"] = {q: _probe(lorad, pixels, path, (None,), train=False)["logits"]["base"]
                                     for q, path in QUANTISED.items()}
    print(json.dumps({"machine": os.uname().machine, **out}))


if __name__ == "__main__":
    main()
