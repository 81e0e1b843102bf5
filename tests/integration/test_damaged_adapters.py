"""One damaged adapter on disk, over real HTTP against a real daemon: it is listed as
damaged (the reason for authenticated callers only), never served, repaired by a rollback,
a new version or a delete, and every other adapter lists and serves as before. Also: a
daemon SIGKILLed at every write of a new adapter's creation leaves nothing visible, or the
complete adapter."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from lorad.adapters.registry import META_FILE
from tests.integration.lorad_process import (
    MODEL,
    DemoMath,
    RunningDaemon,
    digit_probe,
    logits_of,
    start_daemon,
)

KILLPOINT = Path(__file__).resolve().parents[1] / "ota" / "killpoint"
ADAPTERS = f"/v2/models/{MODEL}/adapters"


def _listing(daemon: RunningDaemon, *, token: bool = True) -> dict[str, dict[str, object]]:
    r = daemon.request("GET", ADAPTERS, **({} if token else {"token": None}))
    assert r.status == 200, r.body
    return {a["name"]: a for a in r.json()}


def _garbage(adir: Path) -> None:
    (adir / "current").write_bytes(b"\x00garbage\n")


def _empty(adir: Path) -> None:
    (adir / "current").write_bytes(b"")


def _dangling(adir: Path) -> None:
    (adir / "current").write_text("77\n")


def _etc_passwd(adir: Path) -> None:
    (adir / "current").unlink()
    (adir / "current").symlink_to("/etc/passwd")


def _record_truncated(adir: Path) -> None:
    record = adir / "2" / META_FILE
    record.write_bytes(record.read_bytes()[:25])


def _record_missing(adir: Path) -> None:
    (adir / "2" / META_FILE).unlink()


def _version_deleted(adir: Path) -> None:
    shutil.rmtree(adir / "2")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage-current": _garbage, "empty-current": _empty, "current-to-etc-passwd": _etc_passwd,
    "dangling-current": _dangling, "truncated-lorad-json": _record_truncated,
    "missing-lorad-json": _record_missing, "deleted-version-dir": _version_deleted,
}
#: A damaged pointer leaves both versions sound; a damaged version 2 leaves version 1.
SOUND = {"truncated-lorad-json": [1], "missing-lorad-json": [1], "deleted-version-dir": [1]}
REPAIRS = ("rollback", "upload", "delete")


@pytest.mark.parametrize(("damage", "repair"), [(d, REPAIRS[i % 3]) for i, d in enumerate(DAMAGE)])
def test_one_damaged_adapter_is_listed_refused_and_repaired(
        daemon: RunningDaemon, demo_math: DemoMath, damage: str, repair: str) -> None:
    name = f"hurt-{damage}"
    probe = digit_probe()
    for column in (1, 2):  # versions 1 and 2; 2 is current
        r = daemon.upload(name, demo_math.marker_adapter(probe, column, 3.0))
        assert r.status == 201, r.body
    r = daemon.upload(f"fine-{damage}", demo_math.marker_adapter(probe, 4, 3.0))
    assert r.status == 201, r.body
    DAMAGE[damage](daemon.state_dir / "adapters" / name)

    # Listed, as damaged; everyone else as before.
    listing = _listing(daemon)
    hurt = listing[name]
    assert (hurt["state"], hurt["versions"], hurt["cached"]) == ("damaged", SOUND.get(damage, [1, 2]), False)
    assert str(daemon.state_dir) in str(hurt["reason"])
    assert listing[f"fine-{damage}"]["state"] == "ready"
    assert all(a["state"] == "ready" for n, a in listing.items() if n != name)
    anonymous = _listing(daemon, token=False)[name]
    assert anonymous["state"] == "damaged" and "reason" not in anonymous
    r = daemon.request("GET", f"{ADAPTERS}/{name}", token=None)
    assert r.status == 200 and r.json()["state"] == "damaged" and "reason" not in r.json()
    assert "reason" in daemon.request("GET", f"{ADAPTERS}/{name}").json()

    # Never served: a 409 that says so and how to repair; a stranger sees no path.
    r = daemon.infer(probe, name)
    assert r.status == 409, r.body
    assert "is damaged on disk" in r.json()["error"] and "roll back to a sound stored version (1" in r.json()["error"]
    stranger = daemon.request("POST", f"/v2/models/{MODEL}/infer", token=None, json_body={
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": probe.ravel().tolist()}],
        "parameters": {"adapter": name}})
    assert stranger.status == 409 and "/" not in stranger.json()["error"]
    assert "is damaged on disk" in stranger.json()["error"]
    assert daemon.infer(probe, f"fine-{damage}").status == 200
    assert daemon.request("POST", f"{ADAPTERS}/{name}/load").status == 409

    if repair == "rollback":
        r = daemon.request("POST", f"{ADAPTERS}/{name}/rollback", json_body={"version": 1})
        assert r.status == 200 and r.json()["version"] == 1 and r.json()["state"] == "ready", r.body
        served = daemon.infer(probe, name)
        assert served.status == 200 and served.json()["parameters"]["adapter_version"] == 1
        assert logits_of(served)[0, 1] > logits_of(daemon.infer(probe))[0, 1] + 2.5
    elif repair == "upload":
        r = daemon.upload(name, demo_math.marker_adapter(probe, 3, 3.0))
        assert r.status == 201 and r.json()["version"] == 3, r.body
        assert daemon.infer(probe, name).json()["parameters"]["adapter_version"] == 3
    else:
        assert daemon.request("DELETE", f"{ADAPTERS}/{name}").status == 200
        assert name not in _listing(daemon)
        assert not (daemon.state_dir / "adapters" / name).exists()
        assert os.path.exists("/etc/passwd")
        return
    assert _listing(daemon)[name]["state"] == "ready"


def test_rollback_to_a_damaged_version_is_409(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    for column in (1, 2):
        assert daemon.upload("old-hurt", demo_math.marker_adapter(digit_probe(), column, 1.0)).status == 201
    (daemon.state_dir / "adapters" / "old-hurt" / "1" / META_FILE).write_bytes(b"{")
    r = daemon.request("POST", f"{ADAPTERS}/old-hurt/rollback", json_body={"version": 1})
    assert r.status == 409 and "version 1" in r.json()["error"], r.body
    assert daemon.infer(digit_probe(), "old-hurt").json()["parameters"]["adapter_version"] == 2


def test_a_daemon_starts_with_a_damaged_adapter_and_says_so(tmp_path: Path, demo_math: DemoMath) -> None:
    state = tmp_path / "state"
    d = start_daemon(state)
    try:
        assert d.upload("broken", demo_math.marker_adapter(digit_probe(), 1, 1.0)).status == 201
    finally:
        assert d.stop() == 0
    (state / "adapters" / "broken" / "current").write_bytes(b"banana")
    d = start_daemon(state)
    try:
        listing = _listing(d)
        assert listing["broken"]["state"] == "damaged"
        assert {a["state"] for n, a in listing.items() if n != "broken"} == {"ready"}
        assert "adapter 'broken' is damaged on disk" in d.logs()
    finally:
        assert d.stop() == 0


def _start_armed(state: Path, kill_at: int) -> RunningDaemon:
    """lorad serve that SIGKILLs itself before its kill_at-th rename under state/adapters."""
    env = {"PYTHONPATH": os.pathsep.join([str(KILLPOINT), os.environ.get("PYTHONPATH", "")]),
           "LORAD_KILL_AT_RENAME": str(kill_at), "LORAD_KILL_UNDER": str(state / "adapters")}
    return start_daemon(state, env=env)


@pytest.mark.slow
def test_creation_killed_at_every_write_leaves_nothing_or_the_whole_adapter(
        tmp_path: Path, demo_math: DemoMath) -> None:
    seed = tmp_path / "seed"
    d = start_daemon(seed)  # installs the demo adapters, then stops cleanly
    assert d.stop() == 0
    files = demo_math.marker_adapter(digit_probe(), 5, 3.0)
    kills = 0
    for kill_at in range(1, 20):
        state = tmp_path / f"state-{kill_at}"
        shutil.copytree(seed, state, symlinks=True)
        d = _start_armed(state, kill_at)
        r = None
        try:
            r = d.upload("fresh", files)
        except OSError:  # the connection died with the daemon
            pass
        killed = d.proc.wait(timeout=30) if r is None or d.proc.poll() is not None else None
        if killed is None:
            assert r is not None and r.status == 201, r
            assert d.stop() == 0
            break
        assert killed == -signal.SIGKILL, d.logs()
        kills += 1
        d = start_daemon(state)
        try:
            adir = state / "adapters" / "fresh"
            listing = _listing(d)
            if "fresh" in listing:  # the rename that makes it visible happened: complete
                assert listing["fresh"]["state"] == "ready"
                assert d.infer(digit_probe(), "fresh").status == 200
            else:
                assert not adir.exists(), sorted(p.name for p in adir.iterdir())
            assert list((state / "adapters" / ".staging").iterdir()) == []
            r = d.upload("fresh", files)  # a retry succeeds either way
            assert r.status == 201, r.body
        finally:
            assert d.stop() == 0
    else:
        raise AssertionError("the upload was killed at every one of 19 renames")
    assert kills >= 2  # the high-water mark, and the rename that creates the adapter
