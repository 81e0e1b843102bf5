"""End to end over a real Mosquitto (mutual TLS, passwords, ACLs, packet limit): what only
a broker can show. ``mqtt`` is the conftest fixture (annotations are not evaluated)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from benchmarks.mosquitto import Broker
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.files import chunk_topic
from lorad.ota.status import FleetView, will_for
from lorad.ota.target import Audience
from tests.ota.simulator import FleetSim

EAST = Audience(groups=("east",))


def _device(mqtt: Broker, tmp: Path, kit: SimpleNamespace, fleet: FleetSim, device_id: str,
            sink: Any, **kw: Any) -> OtaClient:
    transport = mqtt.connect(device_id, will=will_for(device_id), timeout_s=kw.pop("timeout_s", 5.0))
    cfg = ClientConfig(device_id=device_id, groups=mqtt.devices[device_id], state_dir=tmp / device_id,
                       trusted_root=fleet.repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT,
                       fetch_timeout_s=kw.pop("fetch_timeout_s", 5.0))
    return OtaClient(cfg, transport, sink)


def _payload(spec: Any) -> str:
    return f"targets/adapters/kws/{spec.audience.label}/{spec.sha256}.{spec.version}.lorad"


def test_publish_to_group_devices_install_and_report_live(mqtt: Broker, tmp_path: Path,
                                                          kit: SimpleNamespace) -> None:
    fleet = FleetSim.create(tmp_path / "fleet", mqtt.connect("fleet"))
    view = FleetView(mqtt.connect("fleet"))
    sinks = {d: kit.MemorySink() for d in ("dev1", "dev2")}
    clients = {d: _device(mqtt, tmp_path, kit, fleet, d, sinks[d]) for d in sinks}
    for c in clients.values():
        c.start()
    try:
        a1 = kit.make_adapter(1)
        fleet.repo.publish_adapter("kws", a1, audience=EAST, probes=kit.probes_for(a1), chunk_size=4096)
        fleet.push()
        assert view.wait_for(lambda v: "kws" in getattr(v.status.get("dev1"), "adapters", {}), 20)
        assert view.online == {"dev1": True, "dev2": True}
        assert sinks["dev1"].serving("kws") is not None
        # dev2 (group west) is not addressed: the ACL hides east's offer, TUF says why
        clients["dev2"].update()
        assert sinks["dev2"].serving("kws") is None
        assert view.wait_for(lambda v: (getattr(v.status.get("dev2"), "last_update", None) or {})
                             .get("reason") == "not_addressed", 10)
        # dev1 vanishes without a clean disconnect: the broker publishes its Last Will
        clients["dev1"]._t._client.disconnect(  # type: ignore[attr-defined]
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        assert view.wait_for(lambda v: v.online.get("dev1") is False, 10)
    finally:
        for c in clients.values():
            c.close()


def test_tampered_chunk_on_the_broker_is_refused(mqtt: Broker, tmp_path: Path, kit: SimpleNamespace) -> None:
    fleet = FleetSim.create(tmp_path / "fleet", mqtt.connect("fleet"))
    sink = kit.MemorySink()
    dev = _device(mqtt, tmp_path, kit, fleet, "dev1", sink)
    a1 = kit.make_adapter(1)
    spec = fleet.repo.publish_adapter("kws", a1, audience=EAST, probes=kit.probes_for(a1), chunk_size=1024)
    fleet.push()
    fleet.transport.publish(chunk_topic(_payload(spec), 0), b"\0" * 1024, retain=True)
    [r] = dev.update()
    assert (r.result, r.reason) == ("rejected", "chunk_digest") and sink.serving("kws") is None


def test_broker_restarted_mid_transfer_resumes_with_missing_chunks_only(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace) -> None:
    fleet = FleetSim.create(tmp_path / "fleet", mqtt.connect("fleet"))
    sink = kit.MemorySink()
    dev = _device(mqtt, tmp_path, kit, fleet, "dev1", sink, fetch_timeout_s=20, timeout_s=20)
    a1 = kit.make_adapter(1)
    spec = fleet.repo.publish_adapter("kws", a1, audience=EAST, probes=kit.probes_for(a1), chunk_size=256)
    fleet.push()
    name, n = _payload(spec), len(spec.chunks)
    spy = mqtt.connect("fleet")
    held: dict[int, bytes] = {}
    spy.subscribe([chunk_topic(name, i) for i in range(n // 2, n)],
                  lambda t, p: p and held.setdefault(int(t.rsplit("/", 1)[1]), p))
    deadline = time.monotonic() + 5
    while len(held) < n - n // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in held:  # only the first half is on the broker when the transfer starts
        fleet.transport.publish(chunk_topic(name, i), b"", retain=True)
    results: list[Any] = []
    th = threading.Thread(target=lambda: results.extend(dev.update()))
    th.start()
    stage = tmp_path / "dev1" / "staging" / spec.sha256
    deadline = time.monotonic() + 10
    while len(list(stage.glob("*.chunk"))) < n // 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(list(stage.glob("*.chunk"))) == n // 2
    mqtt.restart(down_s=0.3)
    for i, data in held.items():  # the fleet reconnects and publishes the rest
        fleet.transport.publish(chunk_topic(name, i), data, retain=True)
    th.join(40)
    assert not th.is_alive()
    [r] = results
    assert r.result == "installed", r
    assert dev.reader.fetch_count[name] == n  # every chunk exactly once across the restart
