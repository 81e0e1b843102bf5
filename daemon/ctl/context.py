"""What every loractl command gets: the parsed arguments' connection settings and output mode."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad.daemon.auth import AuthError, read_token
from lorad.daemon.paths import ADDR_FILE, TOKEN_FILE, default_state_dir

from .client import Client, UsageError
from .output import Render, emit

__all__ = ["Context", "Handler", "DEFAULT_URL", "add_connection_arguments", "add_command"]

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass
class Context:
    client: Client
    #: Model name used when ``--model`` is not given: the one the daemon announced.
    model: str
    as_json: bool

    def emit(self, data: object, render: Render) -> None:
        emit(data, as_json=self.as_json, render=render)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        state_dir: Path = args.state_dir or Path(os.environ.get("LORAD_STATE_DIR") or default_state_dir())
        announced = _read_addr(state_dir / ADDR_FILE)
        token_file: Path = args.token_file or state_dir / TOKEN_FILE

        def token() -> str:
            try:
                return read_token(token_file)
            except AuthError as e:
                raise UsageError(f"{e} (give the daemon's token file with --token-file)") from e

        url = args.url or os.environ.get("LORAD_URL")
        unix = args.unix_socket
        if url is None and unix is None:
            url = str(announced.get("url") or DEFAULT_URL)
        client = Client(url=url if unix is None else None, unix_socket=unix, token=token, timeout=args.timeout)
        model = args.model or str(announced.get("model") or "demo")
        return cls(client=client, model=model, as_json=args.json)


Handler = Callable[[argparse.Namespace, Context], int]


def _read_addr(path: Path) -> dict[str, object]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def add_connection_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The options every command takes; with ``suppress``, absent options leave the defaults alone."""
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    g = parser.add_argument_group("connection")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"daemon URL (default: $LORAD_URL, else what the daemon wrote to <state-dir>/{ADDR_FILE}, else {DEFAULT_URL})", **d)
    where.add_argument("--unix-socket", type=Path, metavar="PATH", help="talk over the daemon's Unix socket (no token needed)", **d)
    g.add_argument("--state-dir", type=Path, metavar="DIR", help="the daemon's state directory (default: $LORAD_STATE_DIR, else the daemon's default)", **d)
    g.add_argument("--token-file", type=Path, metavar="FILE", help=f"API token file (default <state-dir>/{TOKEN_FILE})", **d)
    g.add_argument("--model", help="model name (default: the one the daemon serves)", **d)
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="per-request timeout (default 30)", **({"default": 30.0} | d))
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables", **d)


_COMMON = argparse.ArgumentParser(add_help=False)
add_connection_arguments(_COMMON, suppress=True)


def add_command(subparsers: argparse._SubParsersAction, name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
    """A leaf command: takes the connection options after its name too, runs ``handler``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[_COMMON], **kwargs)
    parser.set_defaults(handler=handler)
    return parser
