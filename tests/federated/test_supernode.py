"""The daemon's Flower SuperNode: a real ``lorad serve`` joins a real SuperLink over TLS.

Its SuperNode registers, ``/metrics`` says so, a SuperNode killed from outside is started
again (and counted), and when the daemon stops no process of the SuperNode's group is
left. Without a daemon: :class:`SuperNodeProcess` backs off after a SuperNode that cannot
start (a real one, given a key it refuses) and ``stop()`` cuts the back-off short; the
node config survives Flower's own parser; a missing Flower is named with its fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from benchmarks.flower import SuperLink, processes, supernode_children
from lorad.daemon.config import build_config
from lorad.daemon.federated.supernode import (
    INSTALL_HINT,
    SuperNodeNotInstalledError,
    SuperNodeProcess,
    find_supernode,
    node_config_arg,
)
from tests.integration.lorad_process import RunningDaemon, start_daemon, wait_until

pytestmark = pytest.mark.federated


def _process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    return [p.pid for p in processes() if p.pgid == pgid and p.state != "Z"]


def _metric(daemon: RunningDaemon, name: str) -> float:
    text = daemon.request("GET", "/metrics").body.decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def _new_online(superlink: SuperLink, before: set[str]) -> list[dict[str, object]]:
    return [n for n in superlink.nodes() if n["node-id"] not in before and n["status"] == "online"]


def _start(tmp_path: Path, superlink: SuperLink, **federated: object) -> RunningDaemon:
    config = tmp_path / "lorad.yaml"
    config.write_text(json.dumps({"federated": superlink.federated_section(**federated), "trainer": {"enabled": True}}))
    return start_daemon(tmp_path / "state", "--config", str(config))


@pytest.mark.slow
def test_the_daemon_joins_restarts_its_supernode_and_leaves_nothing_behind(tmp_path: Path, superlink: SuperLink) -> None:
    before = {n["node-id"] for n in superlink.nodes()}
    daemon = _start(tmp_path, superlink)
    try:
        [pid] = wait_until(lambda: supernode_children(daemon.proc.pid), 30, "the daemon's flower-supernode child")
        nodes = wait_until(lambda: _new_online(superlink, before), 60, "the SuperNode online at the SuperLink")
        assert len(nodes) == 1, nodes
        assert _metric(daemon, "lorad_federated_supernode_up") == 1
        assert _metric(daemon, "lorad_federated_supernode_restarts_total") == 0
        assert f"supernode: started flower-supernode (pid {pid})" in daemon.logs()
        assert "supernode: Starting Flower SuperNode" in daemon.logs()  # its own output, forwarded
        home = tmp_path / "state" / "flower"
        assert home.is_dir() and home.stat().st_mode & 0o777 == 0o700

        # Killed from outside: logged with its code once, started again after the back-off, counted.
        os.kill(pid, signal.SIGKILL)
        [again] = wait_until(lambda: [p for p in supernode_children(daemon.proc.pid) if p != pid], 30,
                             "a new flower-supernode child")
        wait_until(lambda: _metric(daemon, "lorad_federated_supernode_restarts_total") == 1, 30, "the restart counted")
        assert _metric(daemon, "lorad_federated_supernode_up") == 1
        assert daemon.logs().count(f"(pid {pid}) exited with code -9") == 1, daemon.logs()
        wait_until(lambda: len(_new_online(superlink, before)) >= 2, 60, "the new SuperNode online")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.logs()
    assert _process_group(again) == [], f"processes of the SuperNode's group outlived the daemon:\n{daemon.logs()}"
    assert f"(pid {again}) stopped" in daemon.logs()


def test_a_supernode_that_cannot_start_backs_off_and_stop_cuts_the_wait_short(
        tmp_path: Path, superlink: SuperLink, caplog: pytest.LogCaptureFixture) -> None:
    bad_key = tmp_path / "supernode.key"
    bad_key.write_text("not a key\n")  # flower-supernode refuses it and exits with 1
    cfg = build_config({"federated": superlink.federated_section(auth_key=str(bad_key))},
                       environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    token = tmp_path / "api-token"
    node = SuperNodeProcess(cfg.federated, daemon_url="http://127.0.0.1:9", token_file=token,
                            flwr_home=tmp_path / "flower", backoff_first_s=0.2, backoff_max_s=120)
    assert node.executable == Path(sys.executable).parent / "flower-supernode"
    args = node.arguments(4321)
    assert args[args.index("--auth-supernode-private-key") + 1] == str(bad_key)
    assert superlink.tls is not None and args[args.index("--root-certificates") + 1] == str(superlink.tls.ca)
    assert "--insecure" not in args
    caplog.set_level(logging.INFO, logger="lorad.daemon.federated.supernode")
    node.start()
    try:
        assert node.running and node.pid is not None
        # Back-offs of 0.2, 0.4, 0.8 s: the third start comes after the second exit.
        wait_until(lambda: node.restarts >= 2, 60, "two restarts")
        text = caplog.text
        assert "Node authentication requires elliptic curve private key" in text  # the child's output, forwarded
        assert re.search(r"exited with code 1; starting it again in 0\.4 s", text), text
    finally:
        t0 = time.monotonic()
        node.stop()
        stopped_in = time.monotonic() - t0
    assert not node.running and node.pid is None
    assert stopped_in < 10, stopped_in  # the child is ended, or the back-off interrupted: no 10 s wait
    node.stop()  # twice is fine
    with pytest.raises(RuntimeError, match="make a new one"):
        node.start()


def test_node_config_reads_back_through_flowers_parser() -> None:
    values = {"lorad-url": "http://127.0.0.1:8080", "lorad-token-file": "/var/lib/lorad/it's here/api-token",
              "lorad-adapter": "fleet", "lorad-x": 'a "b" c \\ d'}
    assert parse_config_args([node_config_arg(values)]) == values
    for bad in ("both ' and \"", "new\nline"):
        with pytest.raises(ValueError, match="lorad-url"):
            node_config_arg({"lorad-url": bad})


def test_a_missing_flower_is_named_with_its_fix(tmp_path: Path) -> None:
    with pytest.raises(SuperNodeNotInstalledError) as e:
        find_supernode(python=str(tmp_path / "bin" / "python"), environ={"PATH": str(tmp_path)})
    assert INSTALL_HINT in str(e.value) and "flower-supernode" in str(e.value)
    assert find_supernode() == Path(sys.executable).parent / "flower-supernode"


def test_the_insecure_section_and_arguments(tmp_path: Path) -> None:
    link = SuperLink(tmp_path / "plain")  # not started: only its section is read
    cfg = build_config({"federated": {**link.federated_section(), "superlink": "127.0.0.1:9092"}},
                       environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    node = SuperNodeProcess(cfg.federated, daemon_url="http://[::1]:8080", token_file=tmp_path / "t",
                            flwr_home=tmp_path / "flower")
    args = node.arguments(5555)
    assert args[1:3] == ["--superlink", "127.0.0.1:9092"] and "--insecure" in args
    assert "--root-certificates" not in args and "--auth-supernode-private-key" not in args
    assert args[args.index("--port") + 1] == "5555" and args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--isolation") + 1] == "subprocess"
    env = node.environment()
    assert env["FLWR_HOME"] == str(tmp_path / "flower") and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert parse_config_args([args[args.index("--node-config") + 1]]) == {
        "lorad-url": "http://[::1]:8080", "lorad-token-file": str(tmp_path / "t"), "lorad-adapter": "fleet"}
    node.stop()  # never started: nothing to do


@pytest.mark.slow
def test_a_device_whose_trainer_cannot_start_stays_out_and_says_so(tmp_path: Path, superlink: SuperLink) -> None:
    ledger = tmp_path / "state" / "trainer" / "privacy-ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"\x00garbage, not what lorad wrote" * 64)
    daemon = _start(tmp_path, superlink)
    try:
        assert daemon.request("GET", "/v2/health/ready").json()["training"]["disabled"] == "ledger_damaged"
        assert _metric(daemon, "lorad_federated_supernode_up") == 0
        assert _metric(daemon, "lorad_federated_supernode_restarts_total") == 0
        assert supernode_children(daemon.proc.pid) == []
        assert f"federated: not joining the federation at {superlink.address}: training is disabled" in daemon.logs()
    finally:
        assert daemon.stop() == 0, daemon.logs()
