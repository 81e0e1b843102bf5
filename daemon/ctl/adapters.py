"""``loractl adapters ...``: list, inspect, upload, export, load, pin, unpin, evict, delete, rollback."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from lorad.adapters.errors import InvalidAdapterError
from lorad.adapters.fsutil import atomic_write_bytes, fsync_dir

from .client import UsageError, multipart_body, quoted
from .context import Context, add_command
from .output import cell, table

__all__ = ["register"]

_COLUMNS = ("name", "version", "rank", "bytes", "cached", "pinned", "state")
_ACTIONS = {
    "load": "load the current version into the cache",
    "pin": "keep the adapter in the cache (loads it if needed)",
    "unpin": "let the adapter be evicted again",
    "evict": "drop the adapter from the cache (it stays on disk)",
}


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("adapters", help="manage the daemon's LoRA adapters")
    cmds = group.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    add_command(cmds, "list", _list, help="list stored adapters")

    p = add_command(cmds, "inspect", _inspect, help="show one adapter in detail")
    p.add_argument("name")

    p = add_command(cmds, "upload", _upload, help="upload a PEFT adapter directory as a new version of NAME")
    p.add_argument("name")
    p.add_argument("directory", type=Path, metavar="DIR", help="holds adapter_model.safetensors and adapter_config.json")

    p = add_command(cmds, "export", _export, help="write a stored version of NAME as PEFT files into DIR")
    p.add_argument("name")
    p.add_argument("directory", type=Path, metavar="DIR", help="created if needed; the two PEFT files are replaced")
    p.add_argument("--version", type=int, help="stored version to export (default: the current one)")

    for action, text in _ACTIONS.items():
        p = add_command(cmds, action, _action, help=text)
        p.add_argument("name")
        p.set_defaults(action=action)

    p = add_command(cmds, "delete", _delete, help="delete NAME and all its stored versions")
    p.add_argument("name")

    p = add_command(cmds, "rollback", _rollback, help="serve an earlier stored version of NAME again")
    p.add_argument("name")
    p.add_argument("version", type=int)


def _base(ctx: Context) -> str:
    return f"/v2/models/{quoted(ctx.model)}/adapters"


def _render_info(info: object) -> str:
    rows = [[info.get(c) for c in _COLUMNS]] if isinstance(info, dict) else []
    return table(rows, [c.upper() for c in _COLUMNS])


def _list(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("GET", _base(ctx))

    def render(d: object) -> str:
        rows = [[a.get(c) for c in _COLUMNS] for a in d if isinstance(a, dict)] if isinstance(d, list) else []
        return table(rows, [c.upper() for c in _COLUMNS]) if rows else "no adapters"

    ctx.emit(data, render)
    return 0


def _inspect(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("GET", f"{_base(ctx)}/{quoted(args.name)}")

    def render(d: object) -> str:
        if not isinstance(d, dict):
            return str(d)
        width = max(len(k) for k in d)
        lines = []
        for k, v in d.items():
            if k == "created" and isinstance(v, (int, float)):
                shown = datetime.fromtimestamp(v, UTC).isoformat(timespec="seconds")
            elif isinstance(v, list):
                shown = ", ".join(str(x) for x in v)
            elif isinstance(v, dict):
                shown = json.dumps(v, sort_keys=True)
            else:
                shown = cell(v)
            lines.append(f"{k.ljust(width)}  {shown}")
        return "\n".join(lines)

    ctx.emit(data, render)
    return 0


def _upload(args: argparse.Namespace, ctx: Context) -> int:
    if not args.directory.is_dir():
        raise UsageError(f"{str(args.directory)!r} is not a directory of PEFT adapter files")
    from lorad.adapters.peft_format import read_peft_dir  # numpy and safetensors: for this command only

    try:
        files = read_peft_dir(args.directory)
    except InvalidAdapterError as e:
        raise UsageError(str(e)) from e
    body, content_type = multipart_body(files)
    data = ctx.client.call("PUT", f"{_base(ctx)}/{quoted(args.name)}", body=body, content_type=content_type, auth=True)
    ctx.emit(data, _render_info)
    return 0


def _export(args: argparse.Namespace, ctx: Context) -> int:
    if args.version is not None and args.version < 1:
        raise UsageError(f"--version {args.version}: versions are integers >= 1")
    if args.directory.exists() and not args.directory.is_dir():
        raise UsageError(f"{str(args.directory)!r} exists and is not a directory")
    query = f"?version={args.version}" if args.version is not None else ""
    headers, body = ctx.client.fetch(f"{_base(ctx)}/{quoted(args.name)}/files{query}", accept="application/x-tar", auth=True)
    files = _untar(body)
    args.directory.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        atomic_write_bytes(args.directory / filename, content, mode=0o644)
    fsync_dir(args.directory)
    version = headers.get("x-lorad-adapter-version")
    report = {"name": args.name, "version": int(version) if version and version.isdigit() else None,
              "directory": str(args.directory), "files": sorted(files)}
    ctx.emit(report, lambda d: f"exported {args.name} v{report['version']} to {args.directory}")
    return 0


def _untar(body: bytes) -> dict[str, bytes]:
    """The two PEFT files of an export; anything else in the archive is refused, not written."""
    from lorad.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

    allowed = (WEIGHTS_FILE, CONFIG_FILE)
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            for member in tar:
                if member.name not in allowed or not member.isfile():
                    raise UsageError(f"the export holds {member.name!r}; expected only {', '.join(allowed)}")
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file
                files[member.name] = extracted.read()
    except tarfile.TarError as e:
        raise UsageError(f"the daemon's export is not a valid tar archive: {e}") from e
    missing = [f for f in allowed if f not in files]
    if missing:
        raise UsageError(f"the export lacks {', '.join(missing)}")
    return files


def _action(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("POST", f"{_base(ctx)}/{quoted(args.name)}/{args.action}", auth=True)
    ctx.emit(data, _render_info)
    return 0


def _rollback(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call(
        "POST", f"{_base(ctx)}/{quoted(args.name)}/rollback", json_body={"version": args.version}, auth=True
    )
    ctx.emit(data, _render_info)
    return 0


def _delete(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("DELETE", f"{_base(ctx)}/{quoted(args.name)}", auth=True)
    ctx.emit(data, lambda d: f"deleted adapter {args.name}")
    return 0
