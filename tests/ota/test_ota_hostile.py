"""One device cannot hurt another or the fleet tool; a hostile broker cannot stall a device.

Against the real Mosquitto that ``loractl fleet broker init`` configures (``mqtt``, the
conftest fixture; annotations are not evaluated): a device's credentials under another
device's client id, forged and deeply nested statuses on a device's own topic, a nested
repository index and a publisher that drips metadata chunks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from lorad.ota.cli import FleetSession, fleet_view, main
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.commands import verify_command
from lorad.ota.errors import CommandRejectedError, TransportError, UpdateRejectedError
from lorad.ota.files import INDEX_TOPIC, FileEntry, RepoIndex, RepoReader, chunk_topic
from lorad.ota.repository import FleetRepository
from lorad.ota.rollout import parse_stages
from lorad.ota.rollout_cli import RolloutStore, create_rollout
from lorad.ota.status import DeviceStatus, StatusReporter, status_topic
from lorad.ota.transport import Handler, MqttTransport
from tests.ota.simulator import SimBroker, SimTransport

#: depth far past json's own recursion limit, still below the test broker's 16 KiB packets
DEEP = b"[" * 6000 + b"]" * 6000


class _CountingTransport(MqttTransport):
    """The product transport, counting the disconnects the broker inflicts on it."""

    drops = 0

    def _on_disconnect(self, *args: Any) -> None:
        self.drops += 1
        super()._on_disconnect(*args)


def test_a_device_cannot_take_over_another_devices_client_id(mqtt: Broker) -> None:
    """dev1's credentials under dev2's client id (the daemon's ``lorad-dev2``, or ``dev2``,
    what the broker calls it) connect as dev1 and leave dev2's session alone."""
    dev2 = _CountingTransport(mqtt.config("dev2", client_id="lorad-dev2"))
    dev2.connect()
    mqtt.transports.append(dev2)
    offers = threading.Event()
    dev2.subscribe(["lorad/v1/device/dev2/offer"], lambda t, p: offers.set())
    fleet = mqtt.connect("fleet")
    for impostor_id in ("lorad-dev2", "dev2"):
        impostor = mqtt.connect("dev1", client_id=impostor_id)  # connected: CONNACK came back
        assert impostor.connected
        # a takeover would have closed dev2's session before that CONNACK, and with it its
        # subscription: an offer published now reaches dev2 only if it was never dropped
        offers.clear()
        fleet.publish("lorad/v1/device/dev2/offer", b"still yours?")
        assert offers.wait(10), f"dev2 lost its session to dev1 connecting as {impostor_id!r}"
        assert dev2.drops == 0 and dev2.connected
        impostor.close()  # (two sessions of dev1 itself would take turns: one per user name)
    # The ACLs key on user names: dev1 under dev2's client id still writes only dev1's topics.
    impostor = mqtt.connect("dev1", client_id="lorad-dev2")
    seen: list[str] = []
    fleet.subscribe(["lorad/v1/device/+/status"], lambda t, p: seen.append(t))
    with pytest.raises(TransportError, match="Not authorized: its ACL does not let user 'dev1' write this topic"):
        impostor.publish(status_topic("dev2"), b"forged", retain=True)
    impostor.publish(status_topic("dev1"), b"mine", retain=True)
    got_own = threading.Event()
    fleet.subscribe([status_topic("dev1")], lambda t, p: got_own.set())
    assert got_own.wait(10) and status_topic("dev2") not in seen
    # Each listener admits its own users only; fleet sessions keep their own client ids.
    for user, port in (("fleet", mqtt.port), ("dev1", mqtt.layout.port_of("fleet"))):
        t = MqttTransport(dataclasses.replace(mqtt.config(user, timeout_s=3), port=port))  # the other listener
        with pytest.raises(TransportError, match="Not authorized"):
            t.connect()
    second = mqtt.connect("fleet")
    assert fleet.connected and second.connected


def _forge(device: MqttTransport, device_id: str, payload: bytes) -> None:
    device.publish(status_topic(device_id), payload, retain=True)  # acknowledged: retained now


def _good(device_id: str, groups: Sequence[str]) -> DeviceStatus:
    return DeviceStatus(device_id=device_id, groups=tuple(groups),
                        adapters={"kws": {"version": 2, "fleet_version": 1, "privacy_epsilon": 0.8}},
                        last_update={"result": "installed", "adapter": "kws", "version": 1, "reason": None,
                                     "message": "", "at": 1.0})


#: what dev1 forges on its own status topic -> what the error row must name
FORGED: dict[str, tuple[bytes, str]] = {
    "adapter version as a bare number": (json.dumps({"device_id": "dev1", "adapters": {"kws": 5}}).encode(),
                                         "adapters.kws: expected a mapping, got int 5"),
    "a list": (b"[1, 2, 3]", "status: expected a mapping, got a list of 3"),
    "last_update a string": (json.dumps({"device_id": "dev1", "last_update": "yesterday"}).encode(),
                             "last_update: expected a mapping, got str 'yesterday'"),
    "version a string": (json.dumps({"device_id": "dev1", "adapters": {"kws": {"version": "2"}}}).encode(),
                         "adapters.kws.version: expected int, got str '2'"),
    "nested past the decoder's limit": (DEEP, "may nest at most 16 levels"),
    "nested inside a field": (json.dumps({"device_id": "dev1", "epsilon": {"kws": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}})
                              .encode(), "may nest at most 16 levels"),
    "another device's name": (_good("dev3", ()).encode(), "'dev3' on the status topic of 'dev1'"),
    "terminal escapes in a name": (json.dumps({"device_id": "dev1", "adapters": {"\x1b[2J\x1b[31mkws": {}}}).encode(),
                                   "adapters key: expected a name"),
    "not JSON": (b"\xff\xfe garbage", "status is not valid JSON"),
}


def test_forged_statuses_are_error_rows_and_the_rest_of_the_fleet_is_shown(
        mqtt: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    """dev1 forges each case on its own (permitted) topic; dev3 reports properly. `fleet
    status` exits 0, in a table and in JSON, with dev1 as an error row and dev3 intact."""
    dev1, dev3 = mqtt.connect("dev1"), mqtt.connect("dev3")
    StatusReporter(dev3, "dev3").publish(_good("dev3", ("east", "lab")))
    StatusReporter(dev3, "dev3").online()
    for what, (payload, why) in FORGED.items():
        _forge(dev1, "dev1", payload)
        assert main(["--json", "fleet", "status", *mqtt.fleet_args()]) == 0, what
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, what
        out = json.loads(captured.out)
        assert out["unreadable"] == ["dev1"], what
        assert why in out["devices"]["dev1"]["error"], (what, out["devices"]["dev1"])
        assert set(out["devices"]["dev1"]) == {"online", "device_id", "error"}
        assert out["devices"]["dev3"]["adapters"]["kws"]["fleet_version"] == 1 and out["devices"]["dev3"]["online"]
        assert main(["fleet", "status", *mqtt.fleet_args()]) == 0, what
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "\x1b" not in captured.out, what
        rows = {line.split()[0]: line for line in captured.out.splitlines() if line.startswith("dev")}
        assert "unreadable status:" in rows["dev1"] and "kws" not in rows["dev1"].split("unreadable")[0], what
        assert rows["dev3"].split()[:5] == ["dev3", "yes", "kws", "1", "2"], what
        assert "1 device(s) sent a status that cannot be read: dev1" in captured.out
    # --watch prints the error as a line of its own, among the good ones
    assert main(["fleet", "status", "--watch", "0.1", *mqtt.fleet_args()]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any(d.get("device") == "dev1" and "status is not valid JSON" in d["error"] for d in lines), lines
    assert any(d.get("device_id") == "dev3" for d in lines)
    # a good status again: dev1 is back to normal; free text it reports reaches the
    # operator's terminal without its control characters
    st = _good("dev1", ("east",))
    st = dataclasses.replace(st, last_update={**(st.last_update or {}), "reason": "\x1b[2Jgotcha"})
    StatusReporter(dev1, "dev1").publish(st)
    assert main(["--json", "fleet", "status", *mqtt.fleet_args()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unreadable"] == [] and out["devices"]["dev1"]["adapters"]["kws"]["version"] == 2
    assert main(["fleet", "status", *mqtt.fleet_args()]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\\x1b[2Jgotcha" in text


def test_a_rollout_counts_a_garbage_status_as_that_devices_failure(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    """`fleet rollout run` over dev1..dev3, one of which then forges its status: the
    driver halts at the abort threshold naming dev1 (exit 4), no traceback."""
    devices = {d: mqtt.connect(d) for d in ("dev1", "dev2", "dev3")}
    for d, t in devices.items():
        StatusReporter(t, d).publish(DeviceStatus(device_id=d, groups=mqtt.devices[d]))
    repo = FleetRepository.init(tmp_path / "fleet")
    session = FleetSession(mqtt.connect("fleet"))
    view = fleet_view(session.transport, 10.0)
    a = kit.make_adapter(7)
    out = create_rollout(repo, RolloutStore(repo.dir, "r1"), session, view, adapter_name="kws", adapter=a,
                         stages=parse_stages("100%"), abort_threshold=0.3)
    assert out["devices"] == 3
    session.close()
    _forge(devices["dev1"], "dev1", FORGED["adapter version as a bare number"][0])
    rc = main(["fleet", "rollout", "run", str(repo.dir), "r1", "--settle", "0", "--max-time", "30",
               *mqtt.fleet_args()])
    err = capsys.readouterr().err
    assert rc == 4 and "Traceback" not in err, err
    _plan, state = RolloutStore(repo.dir, "r1").load()
    assert state.status == "aborted" and "1 of 3 devices failed" in state.reason and "dev1" in state.reason


def _device(mqtt: Broker, tmp: Path, kit: SimpleNamespace, repo: FleetRepository, **limits: Any) -> OtaClient:
    cfg = ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp / "dev1", trusted_root=repo.root_bytes(1),
                       base_fingerprint=kit.FINGERPRINT, **limits)
    return OtaClient(cfg, mqtt.connect("dev1"), kit.MemorySink())


def test_a_nested_index_is_refused_as_a_bad_message_not_an_exception_in_the_handler(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    repo = FleetRepository.init(tmp_path / "fleet")
    client = _device(mqtt, tmp_path, kit, repo, fetch_timeout_s=5.0)
    hostile = mqtt.connect("fleet")  # whoever may write the repository topics: a broker's operator
    for index in (b'{"files": ' + DEEP + b"}",
                  b'{"files": {"meta/timestamp.json": {"length": {"a": {"b": 1}}, "chunk_size": 1, "chunks": 1}}}',
                  b'{"files": {"meta/timestamp.json": {"length": true, "chunk_size": 1, "chunks": 1}}}'):
        hostile.publish(INDEX_TOPIC, index, retain=True)
        caplog.clear()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            [r] = client.update()
        assert (r.result, r.reason) == ("rejected", "metadata_invalid"), r
        assert "repository index is malformed" in r.message
        assert time.monotonic() - start < 5.0  # refused on arrival, not after the index timeout
        assert not [rec for rec in caplog.records if "handler for" in rec.getMessage()]
    # a deep command on the device's command topic is refused the same way (pure check)
    with pytest.raises(CommandRejectedError) as e:
        verify_command(b'{"command": ' + b"[" * 3000 + b"]" * 3000 + b"}", keys={}, device_id="dev1", now=0.0,
                       last_seq=0)
    assert e.value.reason == "command_invalid" and "nested too deeply" in e.value.message


def test_a_publisher_dripping_metadata_chunks_is_cut_off_at_the_fetch_bound(
        mqtt: Broker, tmp_path: Path, kit: SimpleNamespace) -> None:
    """The unsigned index announces a 100-chunk root; the publisher sends one chunk every
    0.3 s, well within the 1 s per-chunk timeout (30 s in all). The device gives up after
    its 2 s metadata bound; a file announced over max_metadata_bytes, or in chunks too
    small to be the fleet's, is refused before a chunk is fetched."""
    repo = FleetRepository.init(tmp_path / "fleet")
    client = _device(mqtt, tmp_path, kit, repo, fetch_timeout_s=1.0, metadata_timeout_s=2.0,
                     max_metadata_bytes=128 * 1024)
    hostile = mqtt.connect("fleet")
    name, chunks = "meta/2.root.json", 100
    hostile.publish(INDEX_TOPIC, RepoIndex({name: FileEntry(chunks * 1024, 1024, chunks)}).encode(), retain=True)
    stop, sent = threading.Event(), [0]

    def drip() -> None:
        for i in range(chunks):
            hostile.publish(chunk_topic(name, i), b"x" * 1024)
            sent[0] += 1
            if stop.wait(0.3):  # the attacker's pace: just under the device's per-chunk timeout
                return
    dripper = threading.Thread(target=drip, daemon=True)
    start = time.monotonic()
    dripper.start()
    try:
        [r] = client.update()
    finally:
        stop.set()
        dripper.join(10)
    took = time.monotonic() - start
    assert (r.result, r.reason) == ("failed", None), r
    assert "not complete within 2.0 s" in r.message and "cannot extend it" in r.message, r.message
    assert 2.0 <= took < 8.0, took
    assert client.reader.fetch_count[name] >= 3 and sent[0] < chunks / 2  # progress, and far from the end

    for entry, reason, words in ((FileEntry(200 * 1024, 1024, 200), "too_large", "at most 131072 allowed"),
                                 (FileEntry(100 * 100, 100, 100), "metadata_invalid", "chunks under 1024 bytes")):
        hostile.publish(INDEX_TOPIC, RepoIndex({name: entry}).encode(), retain=True)
        before = client.reader.fetch_count.get(name, 0)
        [r] = client.update()
        assert (r.result, r.reason) == ("rejected", reason) and words in r.message, r
        assert client.reader.fetch_count.get(name, 0) == before  # nothing fetched


class _ReplayingTransport(SimTransport):
    """A hostile broker's side of the link: every retained message is delivered ``times``
    times, one topic after the other, whatever the client unsubscribes."""

    def __init__(self, broker: SimBroker, times: int) -> None:
        super().__init__(broker)
        self.times = times

    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        for t in topics:
            for _ in range(self.times):
                super().subscribe([t], handler)


def test_duplicates_count_against_the_bytes_of_one_metadata_fetch() -> None:
    broker = SimBroker()
    fleet = broker.connect()
    name = "meta/timestamp.json"
    for i in range(2):
        fleet.publish(chunk_topic(name, i), b"y" * 1024, retain=True)
    fleet.publish(INDEX_TOPIC, RepoIndex({name: FileEntry(2048, 1024, 2)}).encode(), retain=True)
    assert RepoReader(_ReplayingTransport(broker, 1), max_meta_bytes=8192).fetch(name, max_length=16384) == \
        b"y" * 2048
    with pytest.raises(UpdateRejectedError) as e:
        RepoReader(_ReplayingTransport(broker, 20), max_meta_bytes=8192).fetch(name, max_length=16384)
    assert e.value.reason == "too_large" and "duplicates included" in e.value.message
