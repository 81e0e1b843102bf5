"""How lorad's command lines print: human tables by default, JSON with ``--json``.

For people, numbers are rounded (:func:`number`: 3 significant digits) and a missing
value is ``-`` or a phrase, never ``None``; ``--json`` keeps full precision. An error in
``--json`` mode is a JSON object on stdout (:func:`fail`), so a script reads one stream;
a reader that closes the pipe early (``| head``) ends the command quietly
(:func:`console_main`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["table", "cell", "number", "emit", "fail", "console_main", "Render", "EXIT_BROKEN_PIPE"]

Render = Callable[[object], str]

#: What a shell reports for a command killed by SIGPIPE (128 + 13); lorad exits so instead.
EXIT_BROKEN_PIPE = 141


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in header]] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def cell(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return number(v)


def number(v: object, digits: int = 3) -> str:
    """``v`` for a person: floats to ``digits`` significant digits, ``-`` for a missing value."""
    if v is None:
        return "-"
    if isinstance(v, float) and not isinstance(v, bool):
        return f"{v:.{digits}g}"
    return str(v)


def emit(data: object, *, as_json: bool, render: Render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(data).rstrip("\n") + "\n")


def fail(prog: str, code: int, message: str, *, as_json: bool, status: int | None = None) -> int:
    """Report an error and return ``code``: JSON on stdout with ``--json``, else a line on stderr."""
    if as_json:
        doc = {"error": message, "exit_code": code, "status": status}
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        print(f"{prog}: {message}", file=sys.stderr)
    return code


def console_main(main: Callable[[], int]) -> int:
    """Run a command's ``main``; a closed stdout (``loractl ... | head``) ends it quietly."""
    try:
        try:
            return main()
        finally:
            sys.stdout.flush()  # a broken pipe shows up here (after --help too), not at interpreter exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
