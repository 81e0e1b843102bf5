"""Giving freed memory back to the system after large requests.

glibc keeps memory freed by a thread in that thread's malloc arena for reuse, so after a
few large requests the daemon's RSS would stay at its peak although nothing is in use.
``malloc_trim(0)`` returns the free pages of every arena; it costs about a millisecond,
so the HTTP layer calls it only after requests whose bodies were large. On a C library
without it (musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

__all__ = ["LARGE_BODY_BYTES", "trim_after_large_request", "trim_now"]

#: Bodies at least this large are followed by a trim.
LARGE_BODY_BYTES = 1 << 20

_log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        _log.info("malloc_trim is not available; freed memory stays with the allocator")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _load_trim()
_running = threading.Lock()


def trim_after_large_request(body_bytes: int) -> None:
    """Return free heap pages to the system when a large request has just finished."""
    if _trim is None or body_bytes < LARGE_BODY_BYTES:
        return
    if _running.acquire(blocking=False):  # one trim at a time is enough
        try:
            _trim(0)
        finally:
            _running.release()


def trim_now() -> None:
    """Return free heap pages now: after start-up, whose model copies (the file's proto, the
    derived graphs, their serialised bytes) are freed but would stay in RSS (SmolLM2-135M:
    754 MB before, see README)."""
    if _trim is not None:
        with _running:
            _trim(0)
