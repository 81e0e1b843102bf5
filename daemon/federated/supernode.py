"""The ``flower-supernode`` child of the daemon: started, supervised, restarted, stopped.

:class:`SuperNodeProcess` runs Flower's SuperNode (``lorad[federated]``) connected to
``federated.superlink``, with subprocess isolation: the SuperNode starts
``flower-superexec``, which starts a ``flwr-clientapp`` per round; the ClientApp reads the
node config (``lorad-url``, ``lorad-token-file``, ``lorad-adapter``) and calls the
daemon's own HTTP API. The child gets its own ``FLWR_HOME`` (``<state_dir>/flower``,
mode 0700), a ``PATH`` that starts with this interpreter's ``bin`` directory (where
``flower-superexec`` and ``flwr-clientapp`` are), and Flower's telemetry turned off (a
device that proves what it learns does not report to a third party). Its output is
forwarded line by line into the daemon's log (logger ``lorad.daemon.federated.supernode``,
prefix ``supernode:``), at the level the line names.

The child is a process group of its own (the SuperNode, its SuperExec and any running
ClientApp), so a stop reaches all of them: SIGTERM, SIGKILL after ``stop_timeout_s``.
When the SuperNode exits by itself, each exit is logged once with its code and the child
is started again after a back-off that doubles from 1 s to 60 s (and starts over after a
child that ran longer than the longest back-off). :meth:`SuperNodeProcess.stop`
interrupts a back-off, and is safe to call twice.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from lorad.daemon.federated.config import FederatedConfig

__all__ = ["SuperNodeProcess", "SuperNodeNotInstalledError", "find_supernode", "node_config_arg", "EXECUTABLE",
           "INSTALL_HINT"]

_log = logging.getLogger(__name__)

#: Flower's SuperNode console script.
EXECUTABLE = "flower-supernode"
#: How to get it.
INSTALL_HINT = "pip install 'lorad[federated]'"

#: Longest line forwarded to the log as one record, bytes (a longer one is split).
_MAX_LINE = 8192
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "INFO :      text" (Flower), "INFO:     text" (uvicorn), "2026-...Z ERROR [uvicorn.error] text"
_LEVELED = re.compile(r"^(?:\S+Z\s+)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b\s*:?\s*(.*)$")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}
_NODE_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class SuperNodeNotInstalledError(RuntimeError):
    """``flower-supernode`` is not installed beside this Python (nor on ``PATH``)."""


def find_supernode(*, python: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The ``flower-supernode`` script next to ``python`` (default: this interpreter), else on ``PATH``."""
    beside = Path(python or sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(EXECUTABLE, path=(os.environ if environ is None else environ).get("PATH"))
    if found is not None:
        return Path(found)
    raise SuperNodeNotInstalledError(
        f"federated.enabled is true but {EXECUTABLE} was found neither beside {python or sys.executable} nor on PATH: "
        f"federated learning needs Flower; install it with {INSTALL_HINT}")


def node_config_arg(values: Mapping[str, str]) -> str:
    """The ``--node-config`` value: ``key='value'`` pairs separated by spaces, each value a TOML string.

    flower-supernode reads each value up to its closing quote, so a value may hold one kind
    of quote but not both; ValueError for such a value, a control character or a bad key."""
    pairs = []
    for key, value in values.items():
        if not _NODE_CONFIG_KEY.match(key):
            raise ValueError(f"node config key {key!r}: expected letters, digits, '_' and '-'")
        pairs.append(f"{key}={_toml_string(key, value)}")
    return " ".join(pairs)


def _toml_string(key: str, value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"node config {key}={value!r}: control characters cannot be passed to {EXECUTABLE}")
    if "'" not in value:
        return f"'{value}'"  # a TOML literal string: no escapes
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise ValueError(f"node config {key}={value!r}: a value with both ' and \" cannot be passed to {EXECUTABLE}")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the child's process group (its leader may be gone; its helpers may not)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _forward(stream: IO[bytes]) -> None:
    """The reader thread: each line of the child's stdout/stderr as one record of the daemon's log."""
    level = logging.INFO
    with stream:
        for raw in iter(lambda: stream.readline(_MAX_LINE), b""):
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            if not line.strip():
                continue
            m = _LEVELED.match(line)
            if m is not None:  # a line without a level (a traceback's) keeps the last one seen
                level, line = _LEVELS[m.group(1)], m.group(2)
            _log.log(level, "supernode: %s", line)


class SuperNodeProcess:
    """One supervised ``flower-supernode`` child for a ``federated:`` section.

    ``daemon_url`` is the daemon's own HTTP base URL and ``token_file`` its admin token
    file, handed to the ClientApp through the node config; ``flwr_home`` is the child's
    ``FLWR_HOME``. ``executable`` defaults to :func:`find_supernode` (which raises
    :class:`SuperNodeNotInstalledError`); ``python`` is the interpreter whose ``bin``
    directory leads the child's ``PATH``. Times are in seconds.
    """

    def __init__(self, config: FederatedConfig, *, daemon_url: str, token_file: Path, flwr_home: Path,
                 executable: Path | None = None, python: str | None = None, environ: Mapping[str, str] | None = None,
                 backoff_first_s: float = 1.0, backoff_max_s: float = 60.0, stop_timeout_s: float = 10.0) -> None:
        if not config.enabled or config.superlink is None:
            raise ValueError("SuperNodeProcess needs a federated: section with enabled: true and a superlink")
        if not 0 < backoff_first_s <= backoff_max_s or stop_timeout_s <= 0:
            raise ValueError(f"expected 0 < backoff_first_s <= backoff_max_s and stop_timeout_s > 0, got "
                             f"{backoff_first_s}, {backoff_max_s}, {stop_timeout_s}")
        self._config = config
        self._superlink = config.superlink
        self._environ = dict(os.environ if environ is None else environ)
        self._python = python or sys.executable
        self._executable = executable if executable is not None else find_supernode(python=self._python,
                                                                                     environ=self._environ)
        self._home = flwr_home
        self._node_config = node_config_arg({"lorad-url": daemon_url, "lorad-token-file": str(token_file),
                                             "lorad-adapter": config.adapter})
        self._backoff_first_s = backoff_first_s
        self._backoff_max_s = backoff_max_s
        self._stop_timeout_s = stop_timeout_s
        self._stopping = threading.Event()
        # Guards spawning against stop(): a child is either started before stop() looks, or not at all.
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._started_at = 0.0
        self._running = False
        self._restarts = 0
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------ what it runs

    @property
    def executable(self) -> Path:
        return self._executable

    @property
    def flwr_home(self) -> Path:
        return self._home

    def arguments(self, runtime_port: int) -> list[str]:
        """The child's command line, with its Runtime API on ``127.0.0.1:runtime_port``."""
        c = self._config
        args = [str(self._executable), "--superlink", self._superlink]
        if c.root_certificates is not None:
            args += ["--root-certificates", str(c.root_certificates)]
        else:
            args.append("--insecure")
        if c.auth_key is not None:
            args += ["--auth-supernode-private-key", str(c.auth_key)]
        args += ["--host", "127.0.0.1", "--port", str(runtime_port), "--isolation", "subprocess",
                 "--node-config", self._node_config]
        return args

    def environment(self) -> dict[str, str]:
        """The child's environment: the daemon's, with FLWR_HOME, PATH and telemetry set."""
        env = dict(self._environ)
        dirs = [str(Path(self._python).parent), str(self._executable.parent), *env.get("PATH", os.defpath).split(os.pathsep)]
        env["PATH"] = os.pathsep.join(dict.fromkeys(d for d in dirs if d))
        env["FLWR_HOME"] = str(self._home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """Whether a child is running now."""
        return self._running

    @property
    def restarts(self) -> int:
        """Children started again after one exited by itself."""
        return self._restarts

    @property
    def pid(self) -> int | None:
        """The running child's pid (also its process group), or None."""
        proc = self._proc
        return proc.pid if proc is not None and self._running else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the child and its supervisor; OSError when the first child cannot be started."""
        if self._supervisor is not None or self._stopping.is_set():
            raise RuntimeError("SuperNodeProcess.start() was called twice or after stop(): make a new one")
        self._home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._home, 0o700)
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="lorad-supernode", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        """Stop the child (SIGTERM to its group, SIGKILL after ``stop_timeout_s``) and join the threads."""
        self._stopping.set()
        supervisor = self._supervisor
        if supervisor is None:
            return
        with self._lock:
            proc = self._proc if self._running else None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
        supervisor.join(self._stop_timeout_s)
        if supervisor.is_alive():
            with self._lock:
                proc = self._proc if self._running else None
            if proc is not None:
                _log.warning("supernode: %s (pid %d) did not stop within %g s of SIGTERM; killing it",
                             EXECUTABLE, proc.pid, self._stop_timeout_s)
                _signal_group(proc.pid, signal.SIGKILL)
            supervisor.join()

    def _spawn(self) -> bool:
        """Start one child (False: stop() came first). OSError when it cannot be executed."""
        port = self._config.supernode_port or _free_loopback_port()
        with self._lock:
            if self._stopping.is_set():
                return False
            proc = subprocess.Popen(self.arguments(port), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=self.environment(), cwd=self._home,
                                    start_new_session=True)
            assert proc.stdout is not None
            reader = threading.Thread(target=_forward, args=(proc.stdout,), name=f"lorad-supernode-log-{proc.pid}",
                                      daemon=True)
            reader.start()
            self._proc, self._reader, self._started_at, self._running = proc, reader, time.monotonic(), True
        _log.info("supernode: started %s (pid %d) for SuperLink %s (%s), runtime API on 127.0.0.1:%d",
                  EXECUTABLE, proc.pid, self._superlink, "TLS" if self._config.root_certificates else "insecure", port)
        return True

    def _supervise(self) -> None:
        delay = self._backoff_first_s
        while True:
            proc, reader, started_at = self._proc, self._reader, self._started_at
            assert proc is not None and reader is not None
            code = proc.wait()
            with self._lock:
                self._running = False
            self._reap(proc, reader)
            if self._stopping.is_set():
                _log.info("supernode: %s (pid %d) stopped, exit code %d", EXECUTABLE, proc.pid, code)
                return
            if time.monotonic() - started_at >= self._backoff_max_s:
                delay = self._backoff_first_s
            _log.warning("supernode: %s (pid %d) exited with code %d; starting it again in %g s",
                         EXECUTABLE, proc.pid, code, delay)
            while True:
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, self._backoff_max_s)
                try:
                    if not self._spawn():
                        return
                except OSError as e:
                    _log.error("supernode: cannot start %s: %s; trying again in %g s", EXECUTABLE, e, delay)
                    continue
                self._restarts += 1
                break

    def _reap(self, proc: subprocess.Popen[bytes], reader: threading.Thread) -> None:
        """After the SuperNode exited: end what it left in its group, then wait for the end of its output."""
        _signal_group(proc.pid, signal.SIGTERM)
        reader.join(self._stop_timeout_s)
        if reader.is_alive():  # a helper ignores SIGTERM and keeps the pipe open
            _signal_group(proc.pid, signal.SIGKILL)
            reader.join(self._stop_timeout_s)
