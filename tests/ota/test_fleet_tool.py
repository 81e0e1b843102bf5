"""``loractl fleet``: every failure is a message and an exit code, and leaves the
repository byte-identical; broker set-up; key id prefixes; tables and JSON."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_adapter_dirs, demo_model_path
from lorad.ota.broker_setup import acl_text, load_broker, password_line
from lorad.ota.cli import main
from lorad.ota.repository import FleetRepository


def _tree(d: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(d):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), d) + "/"] = "dir"
        for n in files:
            p = Path(dirpath) / n
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _publish(repo: Path, *extra: str) -> list[str]:
    return ["fleet", "publish", str(repo), "--name", "invert", "--adapter", str(demo_adapter_dirs()["invert"]),
            "--group", "east", "--base-model", str(demo_model_path()), "--targets", *DEMO_TARGETS,
            "--rank", str(DEMO_RANK), *extra]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    assert main(["fleet", "init", str(d), "--keys", "targets=17"]) == 0
    return d


def test_every_failure_is_an_exit_code_and_leaves_the_repository_byte_identical(
        mqtt: Broker, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = mqtt.fleet_args()
    bad_pw = list(ok)
    (tmp_path / "wrong").write_text("nope")
    bad_pw[bad_pw.index("--password-file") + 1] = str(tmp_path / "wrong")
    targets = FleetRepository(repo).load("root").signed.roles["targets"].keyids
    # 17 keys, 16 hex digits: two share a first digit
    ambiguous = next(k[0] for k in targets if sum(x[0] == k[0] for x in targets) > 1)
    # a device of group east has reported: publishing to east gets as far as each mistake
    from lorad.ota.status import DeviceStatus, StatusReporter
    StatusReporter(mqtt.connect("dev1"), "dev1").publish(DeviceStatus(device_id="dev1", groups=("east",)))
    cases = {
        "missing broker arguments": (_publish(repo), 2, "--broker, --ca, --cert, --key missing"),
        "not an adapter": (["fleet", "publish", str(repo), "--name", "x", "--adapter", str(tmp_path / "notadapter"),
                            "--all", "--base-fingerprint", "sha256:" + "0" * 64, *ok], 2, "not a PEFT adapter"),
        "not authorized": (_publish(repo, *bad_pw), 3, "Not authorized"),
        "chunk larger than the broker carries": (_publish(repo, "--chunk-size", "65536", *ok), 2, "--chunk-size"),
        "unknown key prefix": (["fleet", "rotate", str(repo), "targets", "zz", *ok], 1, "no key of role targets"),
        "ambiguous key prefix": (["fleet", "rotate", str(repo), "targets", ambiguous, *ok], 1, "ambiguous"),
        "unknown device": (["fleet", "command", str(repo), "nodev", "pin", "--adapter", "invert", *ok], 1,
                           "unknown device 'nodev'"),
        "rollback of an unknown adapter": (["fleet", "rollback", str(repo), "--name", "nope", "--to", "1", "--all",
                                            *ok], 1, "never published"),
        "delta from a version never published": (_publish(repo, "--delta-from", "4", *ok), 1, "--delta-from 4"),
        "unknown rollout": (["fleet", "rollout", "status", str(repo), "nope"], 1, "no rollout 'nope'"),
        "rollout stages that shrink": (["fleet", "rollout", "create", str(repo), "r1", "--name", "invert",
                                        "--adapter", str(demo_adapter_dirs()["invert"]),
                                        "--base-fingerprint", "sha256:" + "0" * 64, "--stages", "50%,10%", *ok], 2, "percentages must grow"),
    }
    before = _tree(repo)
    for what, (argv, code, message) in cases.items():
        rc = main(argv)
        err = capsys.readouterr().err
        assert (rc, message in err) == (code, True), (what, rc, err)
        assert "Traceback" not in err
        assert _tree(repo) == before, what
    # a device that is known but serves no such adapter
    rc = main(["fleet", "command", str(repo), "dev1", "pin", "--adapter", "nope", *ok])
    assert rc == 1 and "unknown adapter 'nope'" in capsys.readouterr().err and _tree(repo) == before

    # the same publish with everything in place works, and the version counter is on disk
    assert main(["--json", *_publish(repo, *ok)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 1 and out["pushed"] is True
    assert json.loads((repo / "fleet.json").read_bytes())["published"] == {"invert": 1}


def test_key_prefixes_tables_and_json(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kid = FleetRepository(repo).load("root").signed.roles["root"].keyids[0]
    assert main(["--json", "fleet", "rotate", str(repo), "root", kid[:8], "--no-push"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["revoked"] == kid and out["root_version"] == 2 and out["pushed"] is False
    assert main(["fleet", "keys", str(repo)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("root version 2") and "role" in text and "{" not in text and "[" not in text
    assert main(["--json", "fleet", "keys", str(repo)]) == 0
    assert json.loads(capsys.readouterr().out)["roles"]["root"]["threshold"] == 2


def test_broker_init_writes_a_fleet_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "broker"
    assert main(["fleet", "broker", "init", str(d), "--devices", "3", "--groups", "lobby",
                 "--device", "kiosk-9=east,lab", "--port", "18883"]) == 0
    text = capsys.readouterr().out
    assert f"mosquitto -c {d}/mosquitto.conf" in text and "device_id: kiosk-9" in text and "- lab" in text
    layout = load_broker(d)
    assert layout.devices == {"dev001": ("lobby",), "dev002": ("lobby",), "dev003": ("lobby",),
                              "kiosk-9": ("east", "lab")}
    for u in ("fleet", *layout.devices):
        assert oct(layout.key(u).stat().st_mode & 0o777) == "0o600"
    conf = (d / "mosquitto.conf").read_text()
    assert "listener 18883 127.0.0.1" in conf and "require_certificate true" in conf
    # devices on 18883 with their user name as client id; the fleet tool alone on 18884
    devices_part, fleet_part = conf.split("listener 18883 127.0.0.1")[1].split("listener 18884 127.0.0.1")
    assert "use_username_as_clientid true" in devices_part and "use_username_as_clientid" not in fleet_part
    assert f"password_file {d.resolve()}/passwd\n" in devices_part and "fleet.passwd" in fleet_part
    assert layout.fleet_port == 18884 and "127.0.0.1:18884" in layout.fleet_args()
    assert (d / "fleet.passwd").read_text().startswith("fleet:") and "fleet:" not in (d / "passwd").read_text()
    acl = (d / "acl").read_text()
    assert "user kiosk-9\ntopic read lorad/v1/repo/#\ntopic read lorad/v1/all/offer\n" \
           "topic read lorad/v1/group/east/offer\ntopic read lorad/v1/group/lab/offer\n" in acl
    assert "topic write lorad/v1/device/kiosk-9/status" in acl and "%u" not in acl
    assert acl == acl_text(layout.devices)
    salt = bytes(12)
    line = password_line("u", "pw", salt=salt)
    assert line.startswith("u:$7$101$AAAAAAAAAAAAAAAA$") and len(line.rsplit("$", 1)[1]) == 88
    assert main(["fleet", "broker", "init", str(d), "--devices", "1"]) == 1  # never overwrites
    assert "already holds" in capsys.readouterr().err


def test_acls_confine_a_device_to_its_own_topics(mqtt: Broker) -> None:
    """dev2 (group west) gets neither dev1's commands nor east's offers, and cannot write
    dev1's status; its own offer topic works (and marks the end of what it may read)."""
    import threading

    from lorad.ota.transport import barrier
    fleet, dev2 = mqtt.connect("fleet"), mqtt.connect("dev2")
    for topic in ("lorad/v1/device/dev1/cmd", "lorad/v1/group/east/offer"):
        fleet.publish(topic, b"secret", retain=True)
    got: list[str] = []
    mine = threading.Event()
    dev2.subscribe(["lorad/v1/device/dev1/cmd", "lorad/v1/group/east/offer"], lambda t, p: got.append(t))
    dev2.subscribe(["lorad/v1/device/dev2/offer"], lambda t, p: mine.set())
    fleet.publish("lorad/v1/device/dev2/offer", b"yours")
    assert mine.wait(10) and got == []
    from lorad.ota.errors import TransportError
    with pytest.raises(TransportError, match="Not authorized"):  # the broker refuses it, and says so
        dev2.publish("lorad/v1/device/dev1/status", b"forged", retain=True)
    seen: list[bytes] = []
    fleet.subscribe(["lorad/v1/device/dev1/status"], lambda t, p: seen.append(p))
    barrier(fleet, 10.0)
    assert b"forged" not in seen


def test_a_send_that_fails_half_way_is_published_by_the_next_push(
        mqtt: Broker, tmp_path: Path, kit: object, capsys: pytest.CaptureFixture[str]) -> None:
    """The broker goes away after the index was read: the signed version stays in the
    repository (its counter too), and `fleet push` sends it; no version number is reused."""
    from lorad.ota.cli import FleetSession
    from lorad.ota.client import ClientConfig, OtaClient
    from lorad.ota.errors import TransportError
    from lorad.ota.target import Audience
    k: Any = kit
    repo = FleetRepository.init(tmp_path / "fleet")
    session = FleetSession(mqtt.connect("fleet", timeout_s=1.0))
    mqtt.stop()
    try:
        a = k.make_adapter(8)
        repo.publish_adapter("shelf", a, audience=Audience(groups=("east",)), probes=k.probes_for(a))
        with pytest.raises(TransportError):
            session.push(repo)
    finally:
        mqtt.start()
    session.close()
    assert repo.latest_version("shelf") == 1
    assert main(["fleet", "push", str(repo.dir), *mqtt.fleet_args()]) == 0, capsys.readouterr().err
    device = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                                    trusted_root=repo.root_bytes(1), base_fingerprint=k.FINGERPRINT),
                       mqtt.connect("dev1"), k.MemorySink())
    [r] = device.update()
    assert (r.result, r.adapter, r.version) == ("installed", "shelf", 1), r
    b = k.make_adapter(9)
    assert repo.publish_adapter("shelf", b, audience=Audience(groups=("east",))).version == 2
