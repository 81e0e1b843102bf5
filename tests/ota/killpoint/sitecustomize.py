"""Fault injection for the SIGKILL test, from outside the daemon: Python imports this
module at start-up in every process that has this directory on PYTHONPATH.

With ``LORAD_KILL_AT_RENAME=N`` the process SIGKILLs itself just before the N-th rename
(every atomic write ends in one) whose destination is below one of the
``LORAD_KILL_UNDER`` directories (``os.pathsep``-separated), TUF's metadata cache
excepted. ``lorad serve`` itself is unchanged.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

_AT = int(os.environ.get("LORAD_KILL_AT_RENAME") or 0)
_UNDER = tuple(p for p in os.environ.get("LORAD_KILL_UNDER", "").split(os.pathsep) if p)

if _AT > 0 and _UNDER:
    _count = 0

    def _counted(real: Callable[..., None]) -> Callable[..., None]:
        def op(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
            global _count
            d = os.fsdecode(dst)
            if d.startswith(_UNDER) and "/metadata/" not in d:
                _count += 1
                if _count == _AT:
                    os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *args, **kw)
        return op

    os.replace = _counted(os.replace)  # type: ignore[assignment]
    os.rename = _counted(os.rename)  # type: ignore[assignment]
