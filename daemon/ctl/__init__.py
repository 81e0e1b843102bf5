"""``loractl``: control a running lorad daemon.

Commands come in groups; each group is a module with a ``register(subparsers)`` function
that adds its commands with :func:`lorad.daemon.ctl.context.add_command` (which gives each the
connection options and its handler ``(args, Context) -> exit code``). A new group
(``train``, ``privacy``, ``fleet``) is one module and one entry in :data:`GROUPS`. The groups
are imported when the parser is built, so ``lorad`` (which prints through
:mod:`lorad.daemon.ctl.output`) does not load them; a group imports what its commands need
(numpy, the fleet's TUF and MQTT code) in the handler, so that ``loractl --help`` and the
commands that need none of it start quickly.

Exit codes: 0 ok, 1 the server said no (its error is printed), 2 usage error,
3 cannot connect.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from lorad.daemon.version import lorad_version

from .client import ApiError, ConnectError, UsageError
from .context import Context, add_connection_arguments
from .output import console_main, fail

__all__ = ["main", "build_parser", "GROUPS", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_CONNECT"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3

#: The command groups (modules of this package with a ``register(subparsers)``), in help order.
GROUPS: tuple[str, ...] = ("adapters", "serving", "generate", "training", "fleet")


def build_parser() -> argparse.ArgumentParser:
    from lorad.ota.cli_support import JsonErrorParser

    # Usage errors of any subcommand are the JSON error document under --json (the child
    # parsers inherit the class).
    parser = JsonErrorParser(
        prog="loractl",
        description="Control a running lorad daemon: adapters, inference, health.",
        epilog="exit codes: 0 ok, 1 the server refused (its error is printed), 2 usage error, 3 cannot connect",
    )
    parser.add_argument("--version", action="version", version=f"loractl {lorad_version()}")
    add_connection_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        importlib.import_module(f"{__name__}.{group}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return console_main(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(args.json)
    try:
        ctx = Context.from_args(args)
        return int(args.handler(args, ctx))
    except UsageError as e:
        return fail("loractl", EXIT_USAGE, str(e), as_json=as_json)
    except ConnectError as e:
        return fail("loractl", EXIT_CONNECT, str(e), as_json=as_json)
    except ApiError as e:
        message = e.message if as_json else f"server refused ({e.status}): {e.message}"
        return fail("loractl", EXIT_REFUSED, message, as_json=as_json, status=e.status)
