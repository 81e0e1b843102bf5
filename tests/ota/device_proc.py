"""A device process for the SIGKILL fault test: real AdapterService on the demo model, real
broker. With ``kill_at=N`` it SIGKILLs itself just before the N-th rename of the install
(every atomic write ends in one), counting renames outside the TUF metadata cache.

Prints one JSON line: what it served after recovery (before updating) and the results.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adapters.engine import InferenceEngine
from adapters.registry import AdapterRegistry
from adapters.service import AdapterService
from daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from ota.client import ClientConfig, OtaClient
from ota.transport import MqttConfig, MqttTransport

X = np.random.default_rng(5).random((2, 64), dtype=np.float32)


def _serving(service: AdapterService) -> dict[str, Any]:
    names = [i.name for i in service.list_adapters()]
    if "digits" not in names:
        return {"version": None, "logits": None}
    r = service.infer({"pixels": X}, adapter="digits")
    return {"version": r.version, "logits": r.outputs["logits"].round(4).tolist()}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    kill_at = int(sys.argv[2])
    renames = 0
    real_replace, real_rename = os.replace, os.rename

    def counted(real: Any) -> Any:
        def op(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            nonlocal renames
            if "/metadata/" not in str(dst):
                renames += 1
                if renames == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *a, **kw)
        return op

    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    service = AdapterService(engine, AdapterRegistry(Path(cfg["state"]) / "adapters"), cache_budget_bytes=8 << 20)
    m = cfg["mqtt"]
    transport = MqttTransport(MqttConfig(host="127.0.0.1", port=m["port"], client_id=m["client_id"],
                                         ca_file=Path(m["ca"]), cert_file=Path(m["cert"]),
                                         key_file=Path(m["key"]), username="dev1", password=m["password"]))
    transport.connect()
    client = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=Path(cfg["state"]) / "ota",
                                    trusted_root=Path(cfg["root"]).read_bytes(),
                                    base_fingerprint=engine.fingerprint), transport, service)
    recovered = client.recover()
    before = _serving(service)
    if kill_at:
        os.replace, os.rename = counted(real_replace), counted(real_rename)  # type: ignore[assignment]
    results = client.update()
    os.replace, os.rename = real_replace, real_rename  # type: ignore[assignment]
    print(json.dumps({"recovered": recovered.to_dict() if recovered else None, "before": before,
                      "after": _serving(service), "renames": renames,
                      "results": [r.to_dict() for r in results]}))
    transport.close()


if __name__ == "__main__":
    main()
