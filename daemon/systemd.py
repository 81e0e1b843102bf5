"""systemd integration: sd_notify (READY, STATUS, RELOADING, STOPPING, WATCHDOG) and journald logging.

Log records' ``extra`` fields (``LORAD_ADAPTER``, ``LORAD_VERSION``, ``LORAD_EPSILON``,
``LORAD_SOURCE``) become journald fields through systemd-python's JournalHandler, so
``journalctl -u lorad LORAD_ADAPTER=mirror`` finds one adapter's events.

Outside systemd (no ``NOTIFY_SOCKET``) the notifier does nothing; when ``NOTIFY_SOCKET``
is set but systemd-python is missing, that is said once in the log (no silent fallback).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType

__all__ = ["SystemdNotifier", "setup_logging", "under_systemd"]

_log = logging.getLogger(__name__)


def _import(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Whether systemd started this process with its output going to the journal."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def setup_logging(level: str, *, environ: Mapping[str, str] | None = None,
                  journal_sender: Callable[..., object] | None = None) -> str:
    """Log to journald under systemd, else to stderr; returns which (``journal``/``stderr``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    handler: logging.Handler | None = None
    where = "stderr"
    if under_systemd(environ):
        journal = _import("systemd.journal")
        if journal is not None:
            # ``journal_sender`` replaces journal.send (tests read the fields it is given).
            kwargs = {"sender_function": journal_sender} if journal_sender is not None else {}
            handler = journal.JournalHandler(SYSLOG_IDENTIFIER="lorad", **kwargs)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            where = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if where == "stderr" and under_systemd(environ):
        _log.warning("running under systemd but systemd-python is not installed; logging to stderr")
    return where


class SystemdNotifier:
    """Sends sd_notify messages; a no-op when not started by systemd with Type=notify."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket = env.get("NOTIFY_SOCKET")
        self._daemon = _import("systemd.daemon") if self._socket else None
        if self._socket and self._daemon is None:
            _log.warning("NOTIFY_SOCKET is set but systemd-python is not installed; systemd will not be notified")
        self._watchdog_s = _watchdog_seconds(env)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._daemon is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """``WATCHDOG_USEC`` in seconds when the watchdog is meant for this process."""
        return self._watchdog_s

    def notify(self, *lines: str) -> bool:
        if self._daemon is None:
            return False
        return bool(self._daemon.notify("\n".join(lines)))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration and adapters") -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, as Type=notify-reload requires);
        :meth:`ready` ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping ``WATCHDOG=1`` every half period from the running event loop while ``healthy()``.

        Pinging from the loop itself means a blocked loop stops the pings and systemd
        restarts the daemon, which is the point of the watchdog.
        """
        if self._daemon is None or self._watchdog_s is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._pinger(self._watchdog_s / 2, healthy))

    async def stop_watchdog(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _pinger(self, interval: float, healthy: Callable[[], bool]) -> None:
        warned = False
        while True:
            if healthy():
                self.notify("WATCHDOG=1")
                warned = False
            elif not warned:
                _log.warning("not healthy: withholding the systemd watchdog ping")
                warned = True
            await asyncio.sleep(interval)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        _log.warning("ignoring WATCHDOG_USEC=%r: not an integer number of microseconds", usec)
        return None
    return value / 1e6 if value > 0 else None
