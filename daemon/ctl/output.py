"""How loractl prints: human tables by default, JSON with ``--json``."""

from __future__ import annotations

import json
import sys
from typing import Callable, Sequence

__all__ = ["table", "cell", "emit", "Render"]

Render = Callable[[object], str]


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in header]] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def cell(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "-" if v is None else str(v)


def emit(data: object, *, as_json: bool, render: Render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(data).rstrip("\n") + "\n")
