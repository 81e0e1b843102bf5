"""Signed fleet commands: obeyed only when authentic, addressed here, fresh and not replayed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.mosquitto import Broker
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.commands import Command, command_topic, sign_command, verify_command
from lorad.ota.errors import CommandRejectedError
from lorad.ota.status import FleetView, will_for
from tests.ota.simulator import FleetSim, SimBroker


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, action: str) -> Any:
        if action not in ("load", "pin", "unpin", "evict", "rollback"):
            raise AttributeError(action)
        return lambda *a: self.calls.append((action, *a))


@pytest.fixture
def setup(tmp_path: Path, kit: SimpleNamespace) -> SimpleNamespace:
    clock = kit.Clock()
    broker = SimBroker(clock=clock.now)
    fleet = FleetSim.create(tmp_path / "fleet", broker.connect(), clock=clock.dt)
    sink = Sink()
    cfg = ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                       trusted_root=fleet.repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT)
    client = OtaClient(cfg, broker.connect(), kit.MemorySink(), clock=clock.now)
    ex = client.attach_commands(sink)
    return SimpleNamespace(clock=clock, fleet=fleet, repo=fleet.repo, sink=sink, client=client, ex=ex)


def test_authentic_fresh_command_is_obeyed_once(setup: SimpleNamespace) -> None:
    raw = setup.repo.command("dev1", "pin", adapter="kws")
    assert setup.ex.handle(raw)["result"] == "done"
    assert setup.sink.calls == [("pin", "kws")]
    assert setup.client.state.command_seq == json.loads(raw)["command"]["seq"]
    # the same bytes again (a retained copy redelivered) change nothing
    setup.ex.handle(raw)
    assert setup.sink.calls == [("pin", "kws")]


def test_every_command_is_logged_with_its_outcome(setup: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lorad.ota.commands")
    pin = setup.repo.command("dev1", "pin", adapter="kws")
    remove = setup.repo.command("dev1", "remove", adapter="kws")  # this sink cannot delete: it fails
    for raw in (pin, remove, b"{not json"):
        setup.ex.handle(raw)
    seq = [json.loads(raw)["command"]["seq"] for raw in (pin, remove)]
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lorad.ota.commands"]
    assert logged[:2] == [
        ("INFO", f"OTA command seq {seq[0]} pin kws: done: kws pinned; kws is not served"),
        ("WARNING", f"OTA command seq {seq[1]} remove kws: failed: AttributeError: delete; kws is not served")]
    assert logged[2][0] == "WARNING" and logged[2][1].startswith("OTA command: rejected (command_invalid): "), logged
    assert len(logged) == 3
    assert setup.ex.last_result["message"].startswith("malformed command")


def test_replayed_older_command_is_refused(setup: SimpleNamespace) -> None:
    old = setup.repo.command("dev1", "evict", adapter="kws")
    setup.ex.handle(setup.repo.command("dev1", "load", adapter="kws"))
    r = setup.ex.handle(old)
    assert (r["result"], r["reason"]) == ("rejected", "command_replay")
    assert setup.sink.calls == [("load", "kws")]


@pytest.mark.parametrize("case,reason", [
    ("foreign_key", "command_signature"), ("tampered", "command_signature"),
    ("other_device", "command_target"), ("stale", "command_stale"), ("future", "command_stale"),
    ("garbage", "command_invalid")])
def test_refused_commands(setup: SimpleNamespace, case: str, reason: str) -> None:
    key = setup.repo.command_key()
    now = setup.clock.now()
    cmd = Command.new("dev1", "evict", seq=10, adapter="kws", now=now)
    if case == "foreign_key":
        raw = sign_command(cmd, Ed25519PrivateKey.generate())
    elif case == "tampered":
        env = json.loads(sign_command(cmd, key))
        env["command"]["adapter"] = "other"
        raw = json.dumps(env).encode()
    elif case == "other_device":
        raw = sign_command(Command.new("dev2", "evict", seq=10, adapter="kws", now=now), key)
    elif case == "stale":
        raw = sign_command(Command.new("dev1", "evict", seq=10, adapter="kws", now=now - 3600), key)
    elif case == "future":
        raw = sign_command(Command.new("dev1", "evict", seq=10, adapter="kws", now=now + 3600), key)
    else:
        raw = b"\xff{not json"
    r = setup.ex.handle(raw)
    assert (r["result"], r["reason"]) == ("rejected", reason)
    assert setup.sink.calls == [] and setup.client.state.command_seq == 0


def test_rotated_command_key_takes_over_and_old_one_is_refused(setup: SimpleNamespace) -> None:
    old_key = setup.repo.command_key()
    [old_kid] = setup.repo.command_keys()
    setup.repo.rotate_key("command", old_kid)
    setup.fleet.push()
    setup.client.update()  # the device learns the new root, hence the new command key
    now = setup.clock.now()
    r = setup.ex.handle(sign_command(Command.new("dev1", "load", seq=50, adapter="kws", now=now), old_key))
    assert r["reason"] == "command_signature"
    assert setup.ex.handle(setup.repo.command("dev1", "load", adapter="kws"))["result"] == "done"


def test_verify_is_pure_and_checks_sequence() -> None:
    key = Ed25519PrivateKey.generate()
    from securesystemslib.signer import SSlibKey
    pub = SSlibKey.from_crypto(key.public_key())
    raw = sign_command(Command.new("d", "train_now", seq=5, now=100.0), key)
    assert verify_command(raw, keys={pub.keyid: pub}, device_id="d", now=100.0, last_seq=4).seq == 5
    with pytest.raises(CommandRejectedError) as e:
        verify_command(raw, keys={pub.keyid: pub}, device_id="d", now=100.0, last_seq=5)
    assert e.value.reason == "command_replay"


def test_command_over_the_real_broker(mqtt: Broker, tmp_path: Path, kit: SimpleNamespace) -> None:
    fleet_t = mqtt.connect("fleet")
    fleet = FleetSim.create(tmp_path / "fleet", fleet_t)
    view = FleetView(mqtt.connect("fleet"))
    cfg = ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                       trusted_root=fleet.repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT)
    sink = Sink()
    client = OtaClient(cfg, mqtt.connect("dev1", will=will_for("dev1")), kit.MemorySink())
    client.attach_commands(sink)
    client.start()
    try:
        assert view.wait_for(lambda v: "dev1" in v.status, 10)
        fleet.repo.send_command(fleet_t, "dev1", "pin", adapter="kws")
        assert view.wait_for(lambda v: (v.status["dev1"].last_command or {}).get("result") == "done", 10)
        assert sink.calls == [("pin", "kws")]
        # dev2 cannot even read dev1's command topic (ACL)
        got: list[bytes] = []
        mqtt.connect("dev2").subscribe([command_topic("dev1")], lambda t, p: got.append(p))
        time.sleep(0.3)
        assert got == []
    finally:
        client.close()
