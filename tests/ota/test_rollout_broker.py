"""Against a real Mosquitto made by ``loractl fleet broker init``: a three-stage rollout
over twelve simulated devices (some failing their health check) that progresses, halts
at the abort threshold and rolls back; an install deferred by the window; a device
refusing an adapter over its ε policy, while ``fleet status`` shows the ε of the other."""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.mosquitto import Broker, create_broker
from lorad.ota.cli import FleetSession, fleet_view, main
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.privacy import PrivacyPolicy, PrivacyRecord
from lorad.ota.repository import FleetRepository
from lorad.ota.rollout import RolloutPlan, parse_stages, select
from lorad.ota.rollout_cli import RolloutStore, create_rollout
from lorad.ota.status import FleetView, will_for
from lorad.ota.target import Audience
from lorad.ota.window import InstallWindow

from .conftest import MAX_PACKET

NAMES = [f"r{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    d = tmp_path_factory.mktemp("fleet-broker")
    b = create_broker(d, max_packet=MAX_PACKET, devices={n: ("shop",) for n in NAMES})
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(d, ignore_errors=True)


def _device(b: Broker, name: str, repo: FleetRepository, tmp: Path, kit: SimpleNamespace,
            **cfg: Any) -> SimpleNamespace:
    sink = kit.MemorySink()
    client = OtaClient(ClientConfig(device_id=name, groups=b.devices[name], state_dir=tmp / name,
                                    trusted_root=repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT, **cfg),
                       b.connect(name, will=will_for(name)), sink,
                       clock=cfg.pop("clock", None) or __import__("time").time)
    return SimpleNamespace(name=name, sink=sink, client=client)


def test_three_stage_rollout_progresses_halts_at_the_abort_threshold_and_rolls_back(
        fleet_broker: Broker, tmp_path: Path, kit: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    repo = FleetRepository.init(tmp_path / "fleet")
    session = FleetSession(fleet_broker.connect("fleet"))
    devices = {n: _device(fleet_broker, n, repo, tmp_path, kit) for n in NAMES}
    for d in devices.values():
        d.client.attach_commands(d.sink)
        d.client.start()
    a1, a2 = kit.make_adapter(1), kit.make_adapter(2)
    repo.publish_adapter("shelf", a1, audience=Audience(everyone=True), probes=kit.probes_for(a1))
    session.push(repo)
    view = fleet_view(session.transport, 10.0)

    def on(version: int, names: list[str]) -> Any:
        return lambda v: all((v.status.get(n) is not None and
                              v.status[n].adapters.get("shelf", {}).get("fleet_version") == version) for n in names)
    assert view.wait_for(on(1, NAMES), 60), {n: s.adapters for n, s in view.status.items()}

    store = RolloutStore(repo.dir, "spring")
    stages = parse_stages("10%,50%,100%")
    # plan which devices fail: four that only the last stage reaches (4 of 12 >= 30 %)
    probe = RolloutPlan(name="spring", adapter="shelf", version=2, stages=stages,
                        population={n: ("shop",) for n in NAMES})
    late = [n for n in select(probe, 2) if n not in select(probe, 1)]
    failing = late[:4]
    for n in failing:
        devices[n].sink.corrupt_serving = True  # their health check of v2 fails
    out = create_rollout(repo, store, session, view, adapter_name="shelf", adapter=a2, stages=stages,
                         probes=kit.probes_for(a2), abort_threshold=0.3)
    assert out["version"] == 2 and out["stage_devices"] == [2, 6, 12]
    # the operator's command drives it: exit 4, halted and rolled back
    rc = main(["fleet", "rollout", "run", str(repo.dir), "spring", "--settle", "5", "--max-time", "120",
               *fleet_broker.fleet_args()])
    err = capsys.readouterr().err
    _plan, state = store.load()
    history = " | ".join(m for _, m in state.history)
    assert (rc, state.status, state.stage) == (4, "aborted", 2), (err, history)
    assert "halted: abort threshold reached" in err
    assert "stage 1 healthy (2/2)" in history and "stage 2 healthy (6/6)" in history, history
    assert "4 of 12 devices failed" in state.reason and all(n in state.reason for n in failing)
    installed = [n for n in NAMES if n not in failing]
    assert set(state.rolled_back) == set(installed) and set(state.rolled_back.values()) == {1}

    # the healthy ones obey the signed rollback; the failing ones undid v2 themselves
    def back(v: FleetView) -> bool:
        return all((v.status[n].last_command or {}).get("result") == "done" for n in installed)
    assert view.wait_for(back, 60)
    assert {n: d.sink.current["shelf"] for n, d in devices.items()} == {n: 1 for n in NAMES}
    assert {n: devices[n].client.state.refused("shelf") for n in failing} == {n: 2 for n in failing}
    # the target was withdrawn: nobody is offered v2 any more
    assert not any(s.version == 2 for s in repo.targets().values())

    assert main(["fleet", "rollout", "status", str(repo.dir), "spring"]) == 0
    text = capsys.readouterr().out
    assert "aborted" in text and "abort threshold reached" in text
    assert main(["fleet", "rollout", "resume", str(repo.dir), "spring"]) == 1  # aborted is final
    for d in devices.values():
        d.client.close()


def test_an_install_outside_the_window_is_verified_then_deferred_until_it_opens(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace) -> None:
    repo = FleetRepository.init(tmp_path / "fleet")
    session = FleetSession(mqtt.connect("fleet"))
    clock = kit.Clock()
    local = datetime.datetime.fromtimestamp(clock.now()).astimezone()
    start = (local + datetime.timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    window = InstallWindow.parse(f"{start:%H:%M}-{start + datetime.timedelta(hours=1):%H:%M}")
    reasons: list[str | None] = [None]
    sink = kit.MemorySink()
    client = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                                    trusted_root=repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT,
                                    install_window=window),
                       mqtt.connect("dev1"), sink, clock=clock.now, install_gate=lambda: reasons[0])
    a = kit.make_adapter(3)
    repo.publish_adapter("shelf", a, audience=Audience(groups=("east",)), probes=kit.probes_for(a), chunk_size=512)
    session.push(repo)
    [r] = client.update()
    assert r.result == "deferred" and f"deferred until {start.isoformat(timespec='minutes')}" in r.message
    assert "shelf" not in sink.current and client.retry_at == start.timestamp()
    status = json.loads(client.device_status().encode())
    assert status["last_update"]["result"] == "deferred"
    fetched = sum(client.reader.fetch_count.values())
    clock.advance(start.timestamp() - clock.now() + 60)  # the window opens; the device is on battery
    reasons[0] = "on battery (policy requires external power)"
    [r] = client.update()
    assert r.result == "deferred" and "on battery" in r.message
    reasons[0] = None
    [r] = client.update()
    assert r.result == "installed" and sink.current["shelf"] == 1
    target_chunks = {n: c for n, c in client.reader.fetch_count.items() if n.startswith("targets/")}
    assert sum(target_chunks.values()) == len(repo.targets().popitem()[1].chunks)  # fetched once
    assert sum(client.reader.fetch_count.values()) > fetched  # (only metadata again)


def test_a_device_refuses_an_adapter_over_its_epsilon_policy(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    repo = FleetRepository.init(tmp_path / "fleet")
    session = FleetSession(mqtt.connect("fleet"))
    client = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                                    trusted_root=repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT,
                                    privacy=PrivacyPolicy(max_epsilon=2.0, require_record=True)),
                       mqtt.connect("dev1"), kit.MemorySink())
    rec = dict(delta=1e-5, accountant="rdp", sample_rate=0.02, noise_multiplier=1.0, steps=500, unit="user")
    east = Audience(groups=("east",))
    repo.publish_adapter("loud", kit.make_adapter(4), audience=east, privacy=PrivacyRecord(epsilon=6.5, **rec))
    repo.publish_adapter("quiet", kit.make_adapter(5), audience=east, privacy=PrivacyRecord(epsilon=0.8, **rec))
    repo.publish_adapter("bare", kit.make_adapter(6), audience=east)
    session.push(repo)
    results = {r.adapter: r for r in client.update()}
    assert results["loud"].result == "rejected" and results["loud"].reason == "privacy_budget"
    assert "epsilon=6.5" in results["loud"].message and "max_epsilon=2" in results["loud"].message
    assert results["bare"].reason == "privacy_record_missing"
    assert results["quiet"].result == "installed"
    client.publish_status()
    assert main(["--json", "fleet", "status", *mqtt.fleet_args()]) == 0
    st = json.loads(capsys.readouterr().out)["devices"]["dev1"]
    assert st["adapters"]["quiet"]["privacy_epsilon"] == 0.8 and "loud" not in st["adapters"]
    assert main(["fleet", "status", *mqtt.fleet_args()]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "quiet" in line)
    assert row.split()[0] == "dev1" and "0.8" in row.split()
