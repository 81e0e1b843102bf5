"""daemon.systemd: sd_notify messages over a REAL notify socket, in-process and from the daemon."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lorad.daemon.systemd import SystemdNotifier, setup_logging, under_systemd


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="lorad-sd-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(d)


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def _drain(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
        sock.settimeout(5)
    return out


def test_ready_status_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, _ = notify_socket
    n = SystemdNotifier()
    assert n.enabled
    n.ready("serving model 'demo'")
    assert _recv(sock) == "READY=1\nSTATUS=serving model 'demo'"
    n.status("loading")
    assert _recv(sock) == "STATUS=loading"
    n.stopping()
    assert _recv(sock) == "STOPPING=1\nSTATUS=stopping"


def test_no_socket_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled and n.notify("READY=1") is False


def test_watchdog_pings_at_half_period_only_while_healthy(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, _ = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = SystemdNotifier()
    assert n.watchdog_seconds == pytest.approx(0.2)
    healthy = [True]

    async def scenario() -> None:
        n.start_watchdog(lambda: healthy[0])
        await asyncio.sleep(0.35)
        healthy[0] = False
        before = len(_drain(sock))
        await asyncio.sleep(0.35)
        assert before >= 3  # pings at 0, 0.1, 0.2, 0.3 s
        await n.stop_watchdog()

    asyncio.run(scenario())
    assert _drain(sock) == []  # nothing while unhealthy, nothing after stop


def test_watchdog_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert SystemdNotifier().watchdog_seconds is None


def test_logging_target(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        assert not under_systemd({})
        assert setup_logging("INFO", environ={}) == "stderr"
        assert under_systemd({"INVOCATION_ID": "abc"})
        assert setup_logging("INFO", environ={"JOURNAL_STREAM": "8:1234"}) == "journal"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_daemon_notifies_ready_after_binding_and_stopping_on_sigterm(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorad.daemon.cli", "serve", "--port", "0", "--state-dir", str(state)],
        env=env, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        messages = []
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for m in messages):
            assert time.monotonic() < deadline, messages
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            messages.append(_recv(sock))
        ready = next(m for m in messages if "READY=1" in m)
        # READY only once the socket is bound: the address file exists and answers.
        url = json.loads((state / "lorad.addr").read_text())["url"]
        assert url in ready
        bound = urlsplit(url)
        with socket.create_connection((bound.hostname, bound.port), timeout=5):
            pass
        sock.settimeout(5)
        assert _recv(sock) == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        rest = []
        while not any("STOPPING=1" in m for m in rest):
            rest.append(_recv(sock))
        assert proc.wait(timeout=30) == 0
        assert not (state / "lorad.addr").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_journal_records_carry_structured_fields() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    sent: list[tuple[str, dict[str, object]]] = []
    try:
        where = setup_logging("INFO", environ={"INVOCATION_ID": "abc"},
                              journal_sender=lambda MESSAGE, **fields: sent.append((MESSAGE, fields)))
        assert where == "journal"  # systemd-python's JournalHandler, with a sender that records
        logging.getLogger("lorad.daemon.ota_wiring").info(
            "OTA: installed adapter %r version %s from %s", "alice", 3, "mqtts://broker:8883",
            extra={"LORAD_ADAPTER": "alice", "LORAD_VERSION": 3, "LORAD_SOURCE": "mqtts://broker:8883"})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    message, fields = sent[-1]
    assert message == "lorad.daemon.ota_wiring: OTA: installed adapter 'alice' version 3 from mqtts://broker:8883"
    assert (fields["LORAD_ADAPTER"], fields["LORAD_VERSION"], fields["LORAD_SOURCE"]) == ("alice", 3, "mqtts://broker:8883")
    assert fields["SYSLOG_IDENTIFIER"] == "lorad" and fields["PRIORITY"] == "6"


def _until(sock: socket.socket, pred: Callable[[str], bool], timeout: float = 60) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while not (out and pred(out[-1])):
        assert time.monotonic() < deadline, out
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        out.append(_recv(sock))
    return out


def test_sighup_reloads_with_reloading_monotonic_usec_and_ready_without_dropping_requests(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text("log_level: INFO\n")
    state = tmp_path / "state"
    log = tmp_path / "lorad.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorad.daemon.cli", "serve", "--config", str(cfg), "--port", "0", "--state-dir", str(state)],
            env={**os.environ, "NOTIFY_SOCKET": path}, cwd=Path(__file__).resolve().parents[2],
            stdout=out, stderr=subprocess.STDOUT,
        )
    results: list[int] = []
    stop = threading.Event()
    try:
        _until(sock, lambda m: "READY=1" in m)
        url = json.loads((state / "lorad.addr").read_text())["url"]
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}],
                           "parameters": {"adapter": "mirror"}}).encode()

        def load() -> None:
            while not stop.is_set():
                req = urllib.request.Request(f"{url}/v2/models/demo/infer", data=body,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        results.append(r.status)
                except urllib.error.HTTPError as e:
                    results.append(e.code)
                except OSError:
                    results.append(-1)

        client = threading.Thread(target=load)
        client.start()
        while not results:
            time.sleep(0.01)

        cfg.write_text("log_level: DEBUG\ncache: {budget_bytes: 32MiB}\n")
        before_us = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC is one clock for every process
        served_before = len(results)
        proc.send_signal(signal.SIGHUP)
        reloading = _until(sock, lambda m: "RELOADING=1" in m)[-1]
        after_us = time.monotonic_ns() // 1000
        fields = dict(line.split("=", 1) for line in reloading.split("\n"))
        assert before_us <= int(fields["MONOTONIC_USEC"]) <= after_us
        ready = _until(sock, lambda m: "READY=1" in m)[-1]
        assert "(reloaded)" in ready

        cfg.write_text("cache: {budget_bytes: lots}\n")  # invalid: the running config stays
        proc.send_signal(signal.SIGHUP)
        _until(sock, lambda m: "RELOADING=1" in m)
        assert "reload failed" in _until(sock, lambda m: "READY=1" in m)[-1]
        while len(results) < served_before + 20:
            time.sleep(0.01)
        stop.set()
        client.join(timeout=60)
        assert set(results) == {200}, f"{len(results)} requests, not all answered 200: {set(results)}"

        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert 'lorad_config_reloads_total{result="ok"} 1.0' in metrics
        assert 'lorad_config_reloads_total{result="failed"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        text = log.read_text()
        assert "reload: changes to cache take effect at the next restart" in text
        assert "DEBUG" in text  # the new log level applied at once
        assert "reload: the new configuration is invalid, keeping the running one: cache.budget_bytes" in text
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
