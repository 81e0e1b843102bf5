"""Out of space is an operating condition, and damaged private state fails safe: a real
``lorad serve`` with its state directory on a small tmpfs that fills up, or with a
damaged ledger or example store, keeps serving; what cannot be written answers 507,
nothing is charged for a run the disk cannot hold, and training is disabled (with why,
in /v2/health, /metrics and the log) instead of the daemon refusing to start."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.integration.lorad_process import MODEL, DemoMath, RunningDaemon, digit_probe, start_daemon

_EXAMPLE = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}], "label": 3}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: the state directory's own filesystem, which a test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; returns the filler (delete it to free them)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _metric(daemon: RunningDaemon, name: str) -> str:
    text = daemon.request("GET", "/metrics").body.decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def _serves(daemon: RunningDaemon) -> None:
    r = daemon.infer(digit_probe(), "plus-one")
    assert r.status == 200, r.body


def test_a_full_disk_refuses_writes_with_507_and_serving_goes_on(small_disk: Path) -> None:
    state = small_disk / "state"
    daemon = start_daemon(state)
    try:
        _serves(daemon)
        before = daemon.adapters()
        privacy = daemon.request("GET", f"/v2/models/{MODEL}/adapters/plus-one/privacy").json()
        filler = _fill(small_disk)

        files = DemoMath().marker_adapter(digit_probe(), 3, 0.5)
        r = daemon.upload("fresh", files)
        assert r.status == 507 and "disk is full" in r.json()["error"], r.body
        assert daemon.adapters() == before  # nothing half-written is visible
        # Nor anything half-written on disk: no adapter directory, nothing left in staging.
        assert not (state / "adapters" / "fresh").exists()
        assert not list((state / "adapters" / ".staging").iterdir())
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/plus-one/examples", json_body=_EXAMPLE)
        assert r.status == 507, r.body
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/plus-one/train")
        assert r.status in (507, 400), r.body  # no examples stored: refused before any charge either way
        assert daemon.request("GET", f"/v2/models/{MODEL}/adapters/plus-one/privacy").json() == privacy
        _serves(daemon)
        assert _metric(daemon, "lorad_state_free_bytes ").endswith(" 0.0")

        # A restart on the full disk serves, with training disabled and saying why. (The
        # daemon's exit freed a little: its address file, SQLite's log; fill that too.)
        daemon.stop()
        _fill(small_disk)
        daemon = start_daemon(state)
        _serves(daemon)
        ready = daemon.request("GET", "/v2/health/ready")
        assert ready.status == 200 and ready.json()["training"]["disabled"] == "disk_full", ready.body
        anonymous = daemon.request("GET", f"/v2/models/{MODEL}/adapters/plus-one/train", token=None)
        assert anonymous.status == 503 and "disk_full" in anonymous.json()["error"]
        assert str(state) not in anonymous.json()["error"]  # paths only for the token's holders
        assert 'lorad_training_disabled{reason="disk_full"} 1.0' in _metric(daemon, "lorad_training_disabled")
        assert "training is disabled, serving goes on" in daemon.logs()

        # Space back, restart: training is back.
        filler.unlink()
        daemon.stop()
        daemon = start_daemon(state)
        assert "training" not in daemon.request("GET", "/v2/health/ready").json()
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/plus-one/examples", json_body=_EXAMPLE)
        assert r.status == 201, r.body
    finally:
        daemon.stop()


@pytest.mark.parametrize(("damage", "kind", "hint"), [
    ("privacy-ledger.json", "ledger_damaged", "restore it from a backup"),
    ("examples.sqlite3", "examples_damaged", "move it aside"),
])
def test_damaged_private_state_disables_training_not_serving(tmp_path: Path, damage: str, kind: str,
                                                             hint: str) -> None:
    state = tmp_path / "state"
    daemon = start_daemon(state)
    daemon.request("POST", f"/v2/models/{MODEL}/adapters/plus-one/examples", json_body=_EXAMPLE)
    daemon.stop()
    target = state / "trainer" / damage
    for leftover in state.glob(f"trainer/{damage}-*"):  # SQLite's -wal and -shm beside the store
        leftover.unlink()
    target.write_bytes(b"\x00garbage, not what lorad wrote" * 64)
    daemon = start_daemon(state)
    try:
        _serves(daemon)
        assert daemon.request("GET", "/v2/health/ready").json()["training"]["disabled"] == kind
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/plus-one/train")
        assert r.status == 503 and hint in r.json()["error"] and str(target) in r.json()["error"], r.body
        assert np.isfinite(daemon.infer(digit_probe()).json()["outputs"][0]["data"]).all()
    finally:
        daemon.stop()
