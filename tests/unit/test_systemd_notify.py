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
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from daemon.systemd import SystemdNotifier, setup_logging, under_systemd


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
        [sys.executable, "-m", "daemon.cli", "serve", "--port", "0", "--state-dir", str(state)],
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
