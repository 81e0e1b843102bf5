"""A real Flower SuperLink for tests and benchmarks: its TLS material, the process, and a CLI connection to it.

No mocks: :class:`SuperLink` runs ``flower-superlink`` (Flower 1.42: the Fleet, Control and
Runtime APIs over HTTPS on one port) on a free loopback port, with its own ``FLWR_HOME``
whose ``config.toml`` names the connection ``test`` (default), so that the ``flwr`` CLI
(:meth:`SuperLink.flwr`) talks to it: :meth:`SuperLink.nodes` is ``flwr supernode list``.
Its output goes to ``superlink.log`` in its directory, shown in every error raised here
(and, through tests/conftest.py, in the report of a failed test)::

    tls = make_tls(tmp_path / "tls")
    with SuperLink(tmp_path / "superlink", tls=tls) as link:
        section = link.federated_section()   # the federated: section of a lorad config
        ...                                  # start a lorad daemon with it
        link.wait_nodes(1, timeout_s=60)

Waits poll a condition with a deadline (port open and Uvicorn's start-up line; nodes
listed); none sleeps a fixed time to let something happen.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

# The CA and server certificates `loractl fleet broker init` makes for Mosquitto (EC P-256,
# SANs, serverAuth) are what a SuperLink needs too: one certificate code in the project.
from lorad.ota.broker_setup import _cert, _key, _key_pem

__all__ = ["TlsFiles", "make_tls", "SuperLink", "flower_script", "free_port", "flower_env"]

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0
_CLI_TIMEOUT_S = 60.0
_POLL_S = 0.05
#: Uvicorn's line once the SuperLink's HTTP APIs serve.
_READY_LINE = "Application startup complete"


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, *, names: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 2) -> TlsFiles:
    """Write ``ca.crt``, ``server.crt`` (SANs: ``names``) and ``server.key`` (0600) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_pem = _cert("lorad-test-flower-ca", ca_key, ca_key, None, days=days, ca=True)
    server_key = _key()
    server_pem = _cert(names[0], server_key, ca_key, x509.load_pem_x509_certificate(ca_pem).subject, days=days,
                       server_names=names)
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key")
    files.ca.write_bytes(ca_pem)
    files.cert.write_bytes(server_pem)
    files.key.touch(mode=0o600)
    files.key.chmod(0o600)
    files.key.write_bytes(_key_pem(server_key))
    return files


def flower_script(name: str) -> Path:
    """A Flower console script (``flower-superlink``, ``flwr``, ...) beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: the federated tests need Flower (pip install 'lorad[federated]')")
    return Path(found)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment for a Flower process: its FLWR_HOME, Flower's scripts first on
    PATH (a SuperLink starts ``flower-superexec`` by name), telemetry off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Process:
    """One live process as /proc shows it: its state, parent, process group and argv."""

    pid: int
    state: str
    ppid: int
    pgid: int
    argv: tuple[bytes, ...]


def processes() -> list[Process]:
    """Every process /proc lists now (those that end while it is read are left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = tuple((entry / "cmdline").read_bytes().split(b"\0"))
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        found.append(Process(int(entry.name), fields[0], int(fields[1]), int(fields[2]), argv))
    return found


def supernode_children(pid: int) -> list[int]:
    """Children of ``pid`` running flower-supernode (a lorad daemon's SuperNode)."""
    return [p.pid for p in processes() if p.ppid == pid and any(b"flower-supernode" in a for a in p.argv)]


def _helpers_of(pid: int) -> list[int]:
    """Processes started with ``--parent-pid PID`` (Flower's SuperExec and apps watch that parent)."""
    return [p.pid for p in processes()
            if any(a == b"--parent-pid" and b == str(pid).encode() for a, b in itertools.pairwise(p.argv))]


class SuperLink:
    """``flower-superlink`` with TLS (``tls``) or plain HTTP (``tls=None``) on a free loopback port.

    ``directory`` holds its log (``superlink.log``), its state database (``state.db``) and
    its ``FLWR_HOME`` (``flwr-home``, with the CLI's ``config.toml``). Use it as a context
    manager, or :meth:`start` and :meth:`stop` (safe twice).
    """

    def __init__(self, directory: Path, *, tls: TlsFiles | None = None, host: str = "127.0.0.1") -> None:
        self.dir = directory
        self.tls = tls
        self.host = host
        self.port = 0
        self.flwr_home = directory / "flwr-home"
        self.log = directory / "superlink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ where it is

    @property
    def address(self) -> str:
        """``HOST:PORT`` of its Fleet API (also its Control and Runtime APIs)."""
        return f"{self.host}:{self.port}"

    @property
    def insecure(self) -> bool:
        return self.tls is None

    def federated_section(self, **extra: object) -> dict[str, object]:
        """The ``federated:`` section of a lorad config that joins this SuperLink (``extra`` keys added)."""
        section: dict[str, object] = {"enabled": True, "superlink": self.address}
        if self.tls is not None:
            section["root_certificates"] = str(self.tls.ca)
        else:
            section["insecure"] = True
        return {**section, **extra}

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SuperLink:
        """Start it and wait until it serves; RuntimeError (with its log) when it does not."""
        if self.proc is not None:
            raise RuntimeError("SuperLink.start() was called twice")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(mode=0o700, exist_ok=True)
        for attempt in range(3):  # a free port may be taken before the SuperLink binds it
            self.port = free_port(self.host)
            self._write_cli_config()
            tls_args = (["--insecure"] if self.tls is None else
                        ["--ssl-certfile", str(self.tls.cert), "--ssl-keyfile", str(self.tls.key),
                         "--ssl-ca-certfile", str(self.tls.ca)])
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [str(flower_script("flower-superlink")), "--host", self.host, "--port", str(self.port), *tls_args,
                     "--disable-runtime-dependency-installation", "--database", str(self.dir / "state.db")],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=flower_env(self.flwr_home),
                    cwd=self.dir, start_new_session=True)
            if self._wait_ready(retry=attempt < 2):
                return self
            self.proc = None
        raise RuntimeError(f"flower-superlink found no free port in 3 tries:\n{self.logs()}")

    def _wait_ready(self, *, retry: bool) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            text = self.logs()
            code = self.proc.poll()
            if code is not None:
                if retry and "address already in use" in text.lower():
                    return False
                raise RuntimeError(f"flower-superlink exited with {code} while starting:\n{text}")
            if _READY_LINE in text and _port_open(self.host, self.port):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"flower-superlink did not serve within {_START_TIMEOUT_S:g} s:\n{text}")
            time.sleep(_POLL_S)

    def _write_cli_config(self) -> None:
        # flwr/cli/flower_config.py: [superlink] default = NAME; [superlink.NAME] address, root-certificates | insecure
        conn = [f"address = {json.dumps(self.address)}"]
        conn.append("insecure = true" if self.tls is None else f"root-certificates = {json.dumps(str(self.tls.ca))}")
        (self.flwr_home / "config.toml").write_text('[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                                    + "\n".join(conn) + "\n")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s), then wait for its SuperExec to follow it out."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # The SuperExec runs in a session of its own and exits when it sees its parent gone.
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while (left := _helpers_of(proc.pid)) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ the flwr CLI

    def flwr(self, *args: str, timeout_s: float = _CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this SuperLink (connection ``test``); RuntimeError when it fails."""
        done = subprocess.run([str(flower_script("flwr")), *args], capture_output=True, text=True, cwd=self.dir,
                              env=flower_env(self.flwr_home), timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n"
                               f"SuperLink log:\n{self.logs()}")
        return done

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes it knows (``flwr supernode list --format json``): dicts with ``node-id``,
        ``status`` (registered, online, offline, unregistered), ``online-at``, ..."""
        out = self.flwr("supernode", "list", "--format", "json").stdout
        try:
            doc = json.loads(out[out.index("{"):])
        except ValueError as e:
            raise RuntimeError(f"flwr supernode list printed no JSON: {out!r}") from e
        if not doc.get("success"):
            raise RuntimeError(f"flwr supernode list failed: {doc}")
        return list(doc["nodes"])

    def wait_nodes(self, n: int, timeout_s: float = 60.0, *, status: str = "online") -> list[dict[str, Any]]:
        """Wait until at least ``n`` SuperNodes have ``status``; those nodes (AssertionError at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = [node for node in self.nodes() if node.get("status") == status]
            if len(nodes) >= n:
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(nodes)} of {n} SuperNodes {status} after {timeout_s:g} s: {nodes}\n"
                                     f"SuperLink log:\n{self.logs()}")
            time.sleep(0.2)
