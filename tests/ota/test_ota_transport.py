"""The MQTT transport and chunked repository files against a real Mosquitto.

``Broker`` is the fixture object of conftest.py (annotations are not evaluated).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from benchmarks.mosquitto import Broker
from lorad.ota.errors import TransportError, UpdateRejectedError
from lorad.ota.files import INDEX_TOPIC, RepoReader, chunk_topic, publish_files
from lorad.ota.transport import MqttTransport


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
    with pytest.raises(TransportError, match=r"refused|not connected"):
        t.connect()
    t.close()


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
    # a write outside its own status is dropped by the broker: the index stays the fleet's
    publish_files(fleet, {"a.json": b"{}"}, index={}, chunk_size=1024)
    outsider.publish(INDEX_TOPIC, b'{"files": {}}', retain=True)
    outsider.publish("lorad/v1/device/dev1/status", b"forged", retain=True)
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
