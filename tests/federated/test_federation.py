"""The fleet learns together, end to end, with every part real.

A real SuperLink (TLS) and five real ``lorad serve`` daemons on the demo digits model, each
with its own state, its own examples and its own SuperNode. Three of them (dev1..dev3, OTA
devices on the test's Mosquitto with TLS and ACLs) learn the demo's plus-one relabelling,
each from a different part of the digits (non-IID). dev4 serves the same ONNX file with
other LoRA targets (another base model fingerprint), dev5 trains rank 2 instead of 4
(another A and B shape). ``loractl fleet federate`` (the real CLI, ``flwr run`` inside)
runs two rounds with SecAgg+ and central DP:

- dev4 and dev5 are refused in every round, the reason in the ServerApp's log, and charged
  nothing;
- in round 2, dev3's daemon is killed while it trains: the round still completes with the
  two others (SecAgg+'s threshold), and says so in its record;
- each round's aggregate is published through the OTA path with its privacy record
  (user-level central ε, clients, clip norm, local ε); dev1 and dev2 install the last one
  over MQTT and serve exactly it (its outputs are the published adapter's). Whether it
  learns is the benchmark's question (benchmarks/federated.py): with three users, central
  DP's noise (std z·C/3 on every coordinate) drowns any update, as it must;
- every device's ledger charged each of its rounds at most ``round_epsilon``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from benchmarks.flower import SuperLink, supernode_children
from benchmarks.mosquitto import Broker
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.peft_format import load_peft, read_peft_dir
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.ota.cli import main as fleet_main
from tests.integration.lorad_process import (
    MODEL,
    RunningDaemon,
    fleet_args,
    logits_of,
    loractl_command,
    start_daemon,
    wait_until,
)

pytestmark = [pytest.mark.federated, pytest.mark.slow, pytest.mark.timeout(1200)]

ADAPTER = "fleet"
ROUND_EPSILON = 3.0
TRAINER: dict[str, Any] = {
    "enabled": True, "schedule": False,
    # A round obeys the device's policy (tests/unit/test_federated_round.py declines a busy one);
    # here the test machine's own load must not keep the devices out.
    "policy": {"max_load_per_cpu": 1000.0, "max_requests_per_s": 1e6},
    "adapters": {ADAPTER: {"target_epsilon": 8.0, "batch_size": 32, "epochs": None, "steps": 30,
                           "learning_rate": 0.05, "rank": 4, "clip_norm": 1.0}},
}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _add_examples(daemon: RunningDaemon, x: np.ndarray, y: np.ndarray) -> None:
    for row, label in zip(x, y, strict=True):
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/{ADAPTER}/examples", json_body={
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}],
            "label": int((label + 1) % 10)})
        assert r.status == 201, r.body


def _device(root: Path, name: str, superlink: SuperLink, mqtt: Broker | None, trusted_root: Path,
            **changes: Any) -> RunningDaemon:
    trainer = json.loads(json.dumps(TRAINER))
    trainer["adapters"][ADAPTER].update(changes.pop("trainer", {}))
    cfg: dict[str, Any] = {"trainer": trainer, "federated": superlink.federated_section(
        adapter=ADAPTER, round_epsilon=ROUND_EPSILON, min_examples=20, max_round_s=600), **changes}
    if mqtt is not None:
        cfg["ota"] = {"enabled": True, "device_id": name, "trusted_root": str(trusted_root),
                      "broker": {"host": "127.0.0.1", "port": mqtt.port, "ca_file": str(mqtt.ca),
                                 "cert_file": str(mqtt.cert(name)), "key_file": str(mqtt.key(name)),
                                 "username": name, "password_file": str(mqtt.password_file(name)), "timeout_s": 5},
                      "status_interval_s": 1, "policy": {"require_privacy_record": True, "max_epsilon": 10}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return start_daemon(root / name, "--config", str(path))


def _ledger(daemon: RunningDaemon) -> list[dict[str, Any]]:
    r = daemon.request("GET", f"/v2/models/{MODEL}/adapters/{ADAPTER}/privacy")
    assert r.status == 200, r.body
    return list(r.json()["runs"])


@pytest.fixture
def fleet(tmp_path: Path, superlink: SuperLink, mqtt: Broker,
          capsys: pytest.CaptureFixture[str]) -> Iterator[dict[str, Any]]:
    repo = tmp_path / "repo"
    assert fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) == 0
    capsys.readouterr()
    root = repo / "metadata" / "1.root.json"
    x, y = _digits()
    daemons: dict[str, RunningDaemon] = {}
    orphans: list[int] = []
    try:
        for i, name in enumerate(("dev1", "dev2", "dev3")):
            # dev3 trains longer (a slower device): the test stops it in the middle of round 2.
            daemons[name] = _device(tmp_path, name, superlink, mqtt, root,
                                    **({"trainer": {"steps": 3000}} if name == "dev3" else {}))
            part = (y % 3) == i  # non-IID: each device sees its own digits only
            _add_examples(daemons[name], x[part][:150], y[part][:150])
        daemons["dev4"] = _device(tmp_path, "dev4", superlink, None, root, model={"targets": ["head.weight"]})
        daemons["dev5"] = _device(tmp_path, "dev5", superlink, None, root, trainer={"rank": 2})
        for name in ("dev4", "dev5"):
            _add_examples(daemons[name], x[:60], y[:60])
        superlink.wait_nodes(len(daemons), timeout_s=120)
        yield {"daemons": daemons, "repo": repo, "orphans": orphans, "x": x, "y": y, "tmp": tmp_path}
    finally:
        for daemon in daemons.values():
            daemon.stop()
        for pid in orphans:  # a killed daemon's SuperNode (its own process group)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_rounds_with_secagg_a_dropout_and_refused_devices_then_installed_over_ota(
        fleet: dict[str, Any], superlink: SuperLink, mqtt: Broker) -> None:
    daemons: dict[str, RunningDaemon] = fleet["daemons"]
    tmp: Path = fleet["tmp"]
    assert superlink.tls is not None
    env = {**os.environ, "FLWR_HOME": str(superlink.flwr_home)}
    proc = subprocess.Popen(
        [*loractl_command(), "--json", "fleet", "federate", str(fleet["repo"]), "--name", ADAPTER, "--all",
         "--config", str(tmp / "dev1.yaml"), *fleet_args(mqtt),
         "--superlink", superlink.address, "--root-certificates", str(superlink.tls.ca), "--out", str(tmp / "rounds"),
         "--rounds", "2", "--min-clients", "2", "--central-epsilon", "6", "--clip-norm", "1.0",
         "--round-timeout-s", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Round 2: kill dev3's daemon while it trains (its first round is in its ledger).
        dev3 = daemons["dev3"]
        wait_until(lambda: proc.poll() is not None or (len(_ledger(dev3)) == 2
                                                       and _ledger(dev3)[-1]["status"] == "running"),
                   600, "dev3's second round to start")
        assert proc.poll() is None, proc.communicate()[1][-6000:]
        fleet["orphans"].extend(os.getpgid(pid) for pid in supernode_children(dev3.proc.pid))
        dev3.proc.kill()
        dev3.proc.wait()
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-6000:]
    result = json.loads(out)
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], result
    assert rounds[0]["clients"] == 3 and rounds[1]["clients"] == 2, rounds
    assert 0 < rounds[0]["central_epsilon"] < rounds[1]["central_epsilon"] <= 6.0 + 0.05
    for r in rounds:
        assert r["local_epsilon"] and all(0 < e <= ROUND_EPSILON + 0.05 for e in r["local_epsilon"].values()), r
    # The refused devices, each with its reason, in the ServerApp's log (streamed by flwr run).
    assert err.count("refused: wrong base model") >= 2, err[-6000:]
    assert err.count("is not the federation's") >= 2, err[-6000:]
    assert "update was not received" in err, err[-6000:]
    for name in ("dev4", "dev5"):
        assert _ledger(daemons[name]) == [], f"{name} was charged"
    for name in ("dev1", "dev2"):
        runs = _ledger(daemons[name])
        assert [r["status"] for r in runs] == ["completed", "completed"], runs

    # Published with its privacy record; the live devices install the last round over MQTT and serve it.
    record = json.loads((tmp / "rounds" / "round-0002" / "lorad_privacy.json").read_text())
    assert record["unit"] == "user" and record["clients"] == 2 and record["clip_norm"] == 1.0
    assert record["steps"] == 2 and record["epsilon"] == pytest.approx(rounds[1]["central_epsilon"])
    published = load_peft(read_peft_dir(tmp / "rounds" / "round-0002"))
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    probe = fleet["x"][:16]
    expected = engine.run({"pixels": probe}, engine.prepare(published, name=ADAPTER, version=0))["logits"]
    base = engine.run({"pixels": probe}, None)["logits"]
    assert not np.allclose(expected, base, atol=1e-3)  # the aggregate changes the model
    for name in ("dev1", "dev2"):
        daemon = daemons[name]
        wait_until(lambda d=daemon: (d.adapters().get(ADAPTER) or {}).get("version") == 2, 120,
                   f"{name} installing round 2 over MQTT")
        served = logits_of(daemon.infer(probe, adapter=ADAPTER))
        np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
