"""``loractl``: control a running lorad daemon.

Commands come in groups; each group is a module with a ``register(subparsers)`` function
that adds its commands with :func:`daemon.ctl.context.add_command` (which gives each the
connection options and its handler ``(args, Context) -> exit code``). A new group
(``train``, ``privacy``, ``fleet``) is one module and one entry in :data:`GROUPS`.

Exit codes: 0 ok, 1 the server said no (its error is printed), 2 usage error,
3 cannot connect.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from . import adapters, fleet, serving, training
from daemon.version import lorad_version

from .client import ApiError, ConnectError, UsageError
from .context import Context, add_connection_arguments

__all__ = ["main", "build_parser", "GROUPS", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_CONNECT"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3

#: ``register(subparsers)`` of every command group, in help order.
GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    adapters.register,
    serving.register,
    training.register,
    fleet.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loractl",
        description="Control a running lorad daemon: adapters, inference, health.",
        epilog="exit codes: 0 ok, 1 the server refused (its error is printed), 2 usage error, 3 cannot connect",
    )
    parser.add_argument("--version", action="version", version=f"loractl {lorad_version()}")
    add_connection_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in GROUPS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(args.json)
    try:
        ctx = Context.from_args(args)
        return int(args.handler(args, ctx))
    except UsageError as e:
        return _fail(EXIT_USAGE, str(e), None, as_json)
    except ConnectError as e:
        return _fail(EXIT_CONNECT, str(e), None, as_json)
    except ApiError as e:
        return _fail(EXIT_REFUSED, f"server refused ({e.status}): {e.message}", e, as_json)


def _fail(code: int, message: str, error: ApiError | None, as_json: bool) -> int:
    print(f"loractl: {message}", file=sys.stderr)
    if as_json:
        doc = {"error": error.message if error else message, "status": error.status if error else None}
        print(json.dumps(doc))
    return code
