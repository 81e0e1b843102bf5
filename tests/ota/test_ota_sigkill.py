"""The device is SIGKILLed at every write of an install, then restarted: after recovery it
serves exactly the previous version (or the new one, once committed), never a mixture, and
the restarted update completes. Real broker, real AdapterService, real processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.mosquitto import Broker
from adapters.engine import InferenceEngine
from daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from ota.simulator import FleetSim
from ota.target import Audience
from tests.ota.demo_kit import demo_adapter as _adapter
from tests.ota.demo_kit import demo_logits
from tests.ota.demo_kit import demo_probes as _probes
from tests.ota.device_proc import X

HERE = Path(__file__).parent


def _serves(out: dict[str, Any], want: np.ndarray) -> bool:
    """Whether a device's reported logits (rounded to 4 places) are those of ``want``."""
    return out["logits"] is not None and np.allclose(out["logits"], want, atol=2e-4)


def _run(cfg: Path, kill_at: int) -> tuple[int, dict[str, Any] | None]:
    p = subprocess.run([sys.executable, str(HERE / "device_proc.py"), str(cfg), str(kill_at)],
                       capture_output=True, text=True, timeout=60, cwd=HERE.parents[1])
    if p.returncode == -signal.SIGKILL:
        return p.returncode, None
    assert p.returncode == 0, p.stderr[-3000:]
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_at_every_write_of_an_install(mqtt: Broker, tmp_path: Path) -> None:
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    fleet = FleetSim.create(tmp_path / "fleet", mqtt.connect("fleet"))
    east = Audience(groups=("east",))
    a1, a2 = _adapter(engine, 1), _adapter(engine, 2)
    fleet.repo.publish_adapter("digits", a1, audience=east, probes=_probes(engine, a1))
    fleet.push()
    state = tmp_path / "device"
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"state": str(state), "root": str(tmp_path / "fleet" / "metadata" / "1.root.json"),
                               "mqtt": {"port": mqtt.port, "client_id": f"dev1-{uuid.uuid4().hex[:6]}",
                                        "ca": str(mqtt.ca), "cert": str(mqtt.cert("dev1")),
                                        "key": str(mqtt.key("dev1")), "password": mqtt.passwords["dev1"]}}))
    rc, out = _run(cfg, 0)
    assert out is not None and out["results"][0]["result"] == "installed"
    v1 = out["after"]
    v1_logits, v2_logits = demo_logits(engine, a1, X), demo_logits(engine, a2, X)
    assert _serves(v1, v1_logits) and not _serves(v1, v2_logits)
    baseline = tmp_path / "baseline"
    shutil.copytree(state, baseline, symlinks=True)

    fleet.repo.publish_adapter("digits", a2, audience=east, delta_from=1, probes=_probes(engine, a2),
                               chunk_size=4096)
    fleet.push()
    kills = 0
    for n in range(1, 200):
        shutil.rmtree(state)
        shutil.copytree(baseline, state, symlinks=True)
        rc, out = _run(cfg, n)
        if out is not None:  # fewer than n renames: every write point has been covered
            assert out["results"][0]["result"] == "installed"
            break
        kills += 1
        rc, out = _run(cfg, 0)  # restart
        assert out is not None
        # right after recovery: v1 exactly, or v2 if the kill came after the commit
        assert out["before"] == v1 or _serves(out["before"], v2_logits), (n, out)
        if out["before"] == v1:
            assert out["results"][0]["result"] in ("installed",), (n, out)
        assert out["after"]["logits"] != v1["logits"], (n, out)  # v2 serves after the restart
        assert _serves(out["after"], v2_logits), (n, out)
    print(f"SIGKILLed at {kills} write points")
    assert kills >= 5, f"only {kills} write points"
