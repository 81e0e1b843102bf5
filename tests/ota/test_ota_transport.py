"""The MQTT transport and chunked repository files against a real Mosquitto.

``Broker`` is the fixture object of conftest.py (annotations are not evaluated).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from benchmarks.mosquitto import Broker
from lorad.ota.cli import main as fleet_main
from lorad.ota.errors import TransportError, UpdateRejectedError
from lorad.ota.files import INDEX_TOPIC, RepoReader, chunk_topic, publish_files
from lorad.ota.transport import Backoff, BrokerRefusal, MqttTransport


def test_publish_subscribe_over_mutual_tls(mqtt: Broker) -> None:
    fleet = mqtt.connect("fleet")
    dev = mqtt.connect("dev1")
    got: list[tuple[str, bytes]] = []
    ev = threading.Event()
    dev.subscribe(["lorad/v1/group/east/offer"], lambda t, p: (got.append((t, p)), ev.set()))
    fleet.publish("lorad/v1/group/east/offer", b"hello")
    assert ev.wait(5)
    assert got == [("lorad/v1/group/east/offer", b"hello")]
    # the broker announced its packet limit, so payloads are kept below it
    assert dev.max_payload < mqtt.max_packet


def test_wrong_password_is_refused(mqtt: Broker) -> None:
    t = MqttTransport(mqtt.config("dev1", password="wrong", timeout_s=3))
    with pytest.raises(BrokerRefusal, match=r"refused the connection: Not authorized: user 'dev1' with this "
                                            r"password is not admitted"):
        t.connect()
    t.close()
    assert t.refusals["connect"] >= 1


def _device_args(mqtt: Broker, user: str) -> list[str]:
    """``loractl fleet`` broker arguments with a device's credentials, on the devices' listener."""
    return ["--broker", f"127.0.0.1:{mqtt.port}", "--ca", str(mqtt.ca), "--cert", str(mqtt.cert(user)),
            "--key", str(mqtt.key(user)), "--username", user, "--password-file", str(mqtt.password_file(user))]


@pytest.mark.parametrize("command", ["status", "push"])
def test_the_fleet_tool_with_a_devices_credentials_fails_at_once_naming_the_acl(
        mqtt: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """The broker admits dev1 but its ACL refuses the fleet tool's marker: said at once,
    naming topic, user and the ACL, exit 3, instead of waiting out --timeout and advising
    a larger one."""
    argv = ["fleet", command]
    if command == "push":
        assert fleet_main(["fleet", "init", str(tmp_path / "fleet")]) == 0
        argv.append(str(tmp_path / "fleet"))
    capsys.readouterr()
    started = time.monotonic()
    rc = fleet_main([*argv, *_device_args(mqtt, "dev1"), "--timeout", "60"])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "refused the publish to 'lorad/v1/fleet/sync/" in err, err
    assert "Not authorized: its ACL does not let user 'dev1' write this topic" in err, err
    assert "only the fleet user may write" in err and "larger --timeout" not in err, err
    assert took < 30, f"took {took:.1f} s: the refusal was not noticed, the --timeout of 60 s ran out"


def test_backoff_doubles_to_its_cap_and_jitters_within_the_upper_half() -> None:
    b = Backoff(initial_s=1.0, max_s=60.0)
    assert [b.span(n) for n in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for n in range(12):
        assert b.delay(n, lambda: 0.0) == b.span(n) / 2
        assert b.span(n) / 2 <= b.delay(n, random.Random(n).random) < b.span(n)
    # two devices that lost the broker together come back at different times
    first, second = random.Random(1).random, random.Random(2).random
    waits = [(b.delay(n, first), b.delay(n, second)) for n in range(8)]
    assert all(a != c for a, c in waits)
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(initial_s=5.0, max_s=1.0)


def test_reconnects_wait_a_jittered_exponential_backoff(broker: Broker) -> None:
    """A real transport against an endpoint that takes each connection and drops it
    (the broker unusable): the attempts arrive after waits that double up to the cap,
    each drawn from the jittered upper half of its span."""
    attempts: list[float] = []
    enough = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        stop = threading.Event()

        def take() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                attempts.append(time.monotonic())
                conn.close()
                if len(attempts) >= 6:
                    enough.set()

        taker = threading.Thread(target=take)
        taker.start()
        draws = iter([0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0])
        backoff = Backoff(initial_s=0.2, max_s=1.0)
        t = MqttTransport(dataclasses.replace(broker.config("dev1"), port=server.getsockname()[1]),
                          backoff=backoff, draw=lambda: next(draws))
        try:
            t.start()
            assert enough.wait(30), attempts
        finally:
            t.close()
            stop.set()
            taker.join()
    want = [0.1, 0.4, 0.6, 0.5, 1.0, 0.75]  # span 0.2, 0.4, 0.8, 1.0 (cap), ... with those draws
    assert t.reconnect_waits[:5] == pytest.approx(want[:5])
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for gap, wait in zip(gaps, want, strict=False):
        assert wait - 0.02 <= gap < wait + 1.5, (gaps, want)
    assert not t.connected and "cannot reach" in (t.last_error or "")


def test_acl_device_cannot_read_other_group_or_write_repo(mqtt: Broker) -> None:
    # Mosquitto 2.0 acknowledges a denied subscription but never delivers on it.
    outsider = mqtt.connect("dev2")  # group west only
    member = mqtt.connect("dev1")    # group east
    seen: dict[str, list[str]] = {"dev1": [], "dev2": []}
    both = ["lorad/v1/group/east/offer", "lorad/v1/device/dev1/cmd"]
    outsider.subscribe(both, lambda t, p: seen["dev2"].append(t))
    member.subscribe(both, lambda t, p: seen["dev1"].append(t))
    fleet = mqtt.connect("fleet")
    fleet.publish("lorad/v1/group/east/offer", b"x")
    fleet.publish("lorad/v1/device/dev1/cmd", b"y")
    time.sleep(0.5)
    assert sorted(seen["dev1"]) == sorted(both) and seen["dev2"] == []
    # a write outside its own status is refused by the broker (and said so): the index stays the fleet's
    publish_files(fleet, {"a.json": b"{}"}, index={}, chunk_size=1024)
    for topic in (INDEX_TOPIC, "lorad/v1/device/dev1/status"):
        with pytest.raises(BrokerRefusal, match=f"refused the publish to '{topic}': Not authorized: its ACL "
                                                "does not let user 'dev2' write this topic"):
            outsider.publish(topic, b"forged", retain=True)
    assert outsider.refusals == {"connect": 0, "publish": 2, "subscribe": 0}
    spy: list[bytes] = []
    fleet.subscribe(["lorad/v1/device/dev1/status"], lambda t, p: spy.append(p))
    time.sleep(0.3)
    assert spy == []
    reader = RepoReader(member, timeout_s=3)
    assert "a.json" in reader.index().files


def test_oversized_message_is_refused_before_sending(mqtt: Broker) -> None:
    fleet = mqtt.connect("fleet")
    with pytest.raises(TransportError, match="exceeds the broker's limit"):
        fleet.publish("lorad/v1/all/offer", b"x" * mqtt.max_packet)


def test_chunked_file_round_trip_below_packet_limit(mqtt: Broker) -> None:
    fleet = mqtt.connect("fleet")
    data = os.urandom(5 * mqtt.max_packet + 123)
    entries = publish_files(fleet, {"meta/big.json": data}, index={}, chunk_size=1 << 20)
    assert entries["meta/big.json"].chunk_size <= fleet.max_payload
    assert entries["meta/big.json"].chunks >= 6
    reader = RepoReader(mqtt.connect("dev1"), timeout_s=5)
    assert reader.fetch("meta/big.json", max_length=len(data)) == data
    with pytest.raises(UpdateRejectedError) as e:
        reader.fetch("meta/big.json", max_length=len(data) - 1)
    assert e.value.reason == "too_large"


def test_offer_expires_on_the_broker(mqtt: Broker) -> None:
    fleet = mqtt.connect("fleet")
    fleet.publish("lorad/v1/all/offer", b"soon gone", retain=True, expiry_s=1)
    fleet.publish("lorad/v1/group/east/offer", b"stays", retain=True, expiry_s=60)
    time.sleep(2.2)
    dev = mqtt.connect("dev1")
    got: dict[str, bytes] = {}
    dev.subscribe(["lorad/v1/all/offer", "lorad/v1/group/east/offer"], lambda t, p: got.__setitem__(t, p))
    time.sleep(0.5)
    assert got == {"lorad/v1/group/east/offer": b"stays"}


def test_broker_restart_mid_transfer_fetches_only_missing_chunks(mqtt: Broker) -> None:
    fleet = mqtt.connect("fleet")
    chunk = 4096
    data = os.urandom(chunk * 10)
    # the fleet has published only the first half when the transfer starts
    entries = publish_files(fleet, {"t/payload": data[:chunk * 5]}, index={}, chunk_size=chunk)
    dev = mqtt.connect("dev1", timeout_s=15)
    reader = RepoReader(dev, timeout_s=15)
    received: dict[int, bytes] = {}
    half = threading.Event()

    def accept(i: int, b: bytes) -> None:
        assert i not in received, f"chunk {i} fetched twice"
        received[i] = b
        if len(received) == 5:
            half.set()

    err: list[BaseException] = []

    def run() -> None:
        try:
            reader.fetch_chunks("t/payload", range(10), accept, max_chunk=chunk)
        except BaseException as e:  # reported to the test thread below
            err.append(e)

    th = threading.Thread(target=run)
    th.start()
    assert half.wait(10)
    mqtt.restart(down_s=0.5)
    # the fleet reconnects on its own and publishes the rest
    for i in range(5, 10):
        fleet.publish(chunk_topic("t/payload", i), data[i * chunk:(i + 1) * chunk], retain=True)
    th.join(20)
    assert not th.is_alive() and not err, err
    assert b"".join(received[i] for i in range(10)) == data
    assert reader.fetch_count["t/payload"] == 10  # nothing fetched again
    assert entries["t/payload"].chunks == 5
