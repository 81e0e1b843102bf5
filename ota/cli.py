"""``loractl fleet ...``: the fleet operator's tools (root of trust, publish, keys, status,
commands, rollouts, broker set-up).

:func:`register` has the signature of a ``loractl`` command group (``lorad.daemon.ctl.GROUPS``);
its handlers take ``(args, ctx)`` and ignore the daemon connection. ``python -m lorad.ota.cli``
runs the same commands without the daemon's CLI. Every command prints a table, or one
JSON object with ``--json``. What the commands share (exit codes, broker and adapter
arguments, the broker session) is in :mod:`lorad.ota.cli_support`.

Nothing is signed before everything needed to send it is known good: the adapter is
read and checked, then the broker is reached and its index read, then the repository
is changed; a failure before the send puts the repository back byte for byte
(:class:`lorad.ota.undo.DirUndo`). A send that fails half-way leaves the signed metadata in
the repository and says so; the next ``fleet push`` sends it.

Before anything slow or anything that changes the repository, a command checks what it
can alone: the broker arguments, every ``--key-dir`` (a directory holding keys of this
repository), that the private keys of every role it signs are there, and that the groups
and devices of an audience exist (:func:`_known_audience`: the repository's record of the
devices it has seen, ``members.json``, then the devices' retained statuses on the broker;
``--allow-empty-audience`` signs for devices that have not reported yet). Only then does it
load the base model (``--base-model``/``--config``, for the health probes) and sign.

Exit codes (:data:`EXIT_CODES`):

====  ==========================================================================
0     done
1     refused: verification, keys, repository state, unknown device/group/adapter/key
2     usage: bad or missing arguments, a file that is not what it should be
3     broker: cannot connect, not authorized, no answer in time, send failed
4     rollout halted: the abort threshold was reached and the rollout rolled back
5     rollout not done: ``rollout run`` stopped with the rollout paused, or still
      running when ``--max-time`` passed
====  ==========================================================================

With ``--json`` every outcome is one JSON object on stdout, errors included (usage errors
too: :class:`lorad.ota.cli_support.JsonErrorParser`); a reader that closes the pipe early
(``| head``) ends the command quietly.

What devices report is their own word: a status that cannot be read (malformed, wrong
types, nested too deep, another device's name) is shown for that device as an error row
(``error`` in ``--json``, its name in ``unreadable``) and ``fleet status`` still exits 0;
``fleet rollout run`` counts such a device as failed (reason ``status_unreadable``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.adapters.errors import AdapterError

from .cli_support import (
    EXIT_BROKER,
    EXIT_CODES,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    FleetSession,
    JsonErrorParser,
    ModelLoader,
    ModelSection,
    add_adapter_args,
    add_broker_args,
    check_broker_args,
    connect_broker,
    error_document,
    fleet_view,
    load_adapter,
    open_repo,
    table,
)
from .errors import OtaError, TransportError
from .undo import DirUndo

if TYPE_CHECKING:  # imported where used: `loractl --help` and the commands that need neither start without them
    from .audience import Audience
    from .repository import FleetRepository
    from .status import DeviceStatus, FleetView

__all__ = ["register", "main", "EXIT_CODES", "CliError", "FleetSession", "ModelSection", "fleet_view", "table"]

_ROLES = ("root", "targets", "snapshot", "timestamp")


def _role_map(items: Sequence[str] | None, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or ():
        role, _, value = item.partition("=")
        if role not in _ROLES or not value.isdigit():
            raise ValueError(f"{what} {item!r}: expected ROLE=N with ROLE one of {_ROLES}")
        out[role] = int(value)
    return out


def _audience_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--all", action="store_true", help="every device")
    g.add_argument("--group", action="append", help="a device group (repeatable)")
    g.add_argument("--device", action="append", help="a device id (repeatable, at most 100: more is a group)")
    p.add_argument("--allow-empty-audience", action="store_true",
                   help="sign for groups or devices no known device is or is in (devices that have not reported yet)")


def _audience(args: argparse.Namespace) -> Audience:
    from .audience import MAX_LISTED_DEVICES, Audience

    devices = tuple(dict.fromkeys(args.device or ()))
    if len(devices) > MAX_LISTED_DEVICES:
        raise ValueError(f"--device given {len(devices)} times: at most {MAX_LISTED_DEVICES} devices are signed by "
                         "name (each device downloads the list); publish to a --group, or roll out by percentage")
    return Audience(devices=devices, groups=tuple(dict.fromkeys(args.group or ())), everyone=args.all)


def _known_audience(args: argparse.Namespace, repo: FleetRepository, audience: Audience | None,
                    session: FleetSession | None) -> dict[str, tuple[str, ...]] | None:
    """Refuse (LookupError) an audience naming a group or device the fleet does not know.

    What is known: the repository's record (``members.json``), then, when the command
    reaches the broker and the record does not know a name, the devices' retained statuses.
    Returns what the statuses said (recorded once the command succeeded), or None."""
    if audience is None or audience.everyone or getattr(args, "allow_empty_audience", False):
        return None
    known = repo.known_members()
    missing = repo.unknown_members(audience, known)
    seen = None
    if missing and session is not None:
        view = fleet_view(session.transport, args.timeout)
        seen = {d: tuple(st.groups) for d, st in view.snapshot().items()}
        known = {**known, **seen}
        missing = repo.unknown_members(audience, known)
    if missing:
        groups = sorted({g for gs in known.values() for g in gs})
        where = ("the devices' statuses on the broker and the repository's record" if session is not None else
                 "the repository's record (members.json: what the last commands that reached the broker saw)")
        raise LookupError(f"unknown {', '.join(missing)}: no such device or group among the {len(known)} devices "
                          f"known from {where} (their groups: {', '.join(groups) or 'none'}). Check the name, or "
                          "give --allow-empty-audience to sign for devices that have not reported yet")
    return seen


def _signing(args: argparse.Namespace, change: Callable[[FleetRepository], dict[str, Any]],
             *, roles: Sequence[str], key_dirs: Sequence[Path] = (), new_key_dir: bool = False,
             audience: Audience | None = None) -> dict[str, Any]:
    """Check what can be checked alone, reach the broker, apply ``change`` to the
    repository, send; undo the change if anything fails before the send."""
    check_broker_args(args)
    chunk = getattr(args, "chunk_size", None)
    if chunk is not None and chunk < 256:
        raise ValueError(f"--chunk-size {chunk}: at least 256 bytes")
    repo = open_repo(args, new_key_dir=new_key_dir)
    repo.check_signing_keys(roles)
    if args.no_push:
        _known_audience(args, repo, audience, None)
    session = None if args.no_push else FleetSession.connect(args)
    try:
        if chunk is not None and session is not None and chunk > session.transport.max_payload:
            raise ValueError(f"--chunk-size {chunk} exceeds what the broker carries per message "
                             f"({session.transport.max_payload} bytes of payload)")
        seen = _known_audience(args, repo, audience, session) if session is not None else None
        undo = DirUndo([repo.dir, *key_dirs, *repo.key_dirs], write_once=[repo.dir / "targets", repo.dir / "canonical"])
        try:
            out = change(repo)
        except BaseException:
            undo.restore()
            raise
        if seen:
            repo.record_members(seen)
        if session is None:
            return {**out, "pushed": False}
        try:
            return {**out, **session.push(repo)}
        except TransportError as e:
            raise CliError(EXIT_BROKER, f"signed, but sending failed: {e}. The repository keeps what "
                                        f"was signed; `loractl fleet push` sends it") from e
    finally:
        if session is not None:
            session.close()


# --- output ---------------------------------------------------------------------------


def _kv(data: Mapping[str, Any]) -> str:
    return table(("field", "value"), [(k, v) for k, v in data.items()])


Formatter = Callable[[dict[str, Any]], str]


def _emit(args: argparse.Namespace, data: dict[str, Any] | str, fmt: Formatter) -> None:
    """``data`` as JSON (``--json``) or through ``fmt``; a string (an exposition format) as it is."""
    if isinstance(data, str):
        sys.stdout.write(data)
    elif getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    else:
        print(fmt(data))
    sys.stdout.flush()  # a closed pipe shows here, where _run lets it through


# --- commands ----------------------------------------------------------------------

def _init(args: argparse.Namespace) -> dict[str, Any]:
    from .repository import FleetRepository, RepoSettings

    if args.key_dir and len(args.key_dir) > 1:
        raise ValueError(f"--key-dir given {len(args.key_dir)} times: init writes every key into one directory")
    d = RepoSettings.default()
    settings = RepoSettings(thresholds={**d.thresholds, **_role_map(args.threshold, "--threshold")},
                            key_counts={**d.key_counts, **_role_map(args.keys, "--keys")},
                            expiry_s={**d.expiry_s, **_role_map(args.expiry, "--expiry")})
    repo = FleetRepository.init(args.repo, settings=settings, key_dir=args.key_dir[0] if args.key_dir else None)
    return {"repository": str(repo.dir), "trusted_root": str(repo.dir / "metadata" / "1.root.json")}


_SIGNS_TARGETS = ("targets", "snapshot", "timestamp")


def _publish(args: argparse.Namespace) -> dict[str, Any]:
    from .privacy import read_privacy_record
    audience = _audience(args)

    def change(repo: FleetRepository) -> dict[str, Any]:
        if args.delta_from is not None and not 1 <= args.delta_from <= repo.latest_version(args.name):
            raise LookupError(f"--delta-from {args.delta_from}: {args.name!r} has versions "
                              f"1..{repo.latest_version(args.name)} here")
        # the model (for the health probes) loads once every cheap check has passed
        adapter, probes = load_adapter(args)
        privacy = read_privacy_record(args.adapter, args.privacy_record)
        spec = repo.publish_adapter(args.name, adapter, audience=audience, probes=probes,
                                    delta_from=args.delta_from, dtype="fp16" if args.fp16 else "fp32",
                                    compression=args.compress, chunk_size=args.chunk_size,
                                    privacy=privacy, full_fallback=not args.delta_only)
        return {"adapter": spec.adapter, "version": spec.version, "bytes": spec.length,
                "encoding": spec.encoding, "audience": spec.audience.label,
                "epsilon": None if privacy is None else privacy.epsilon}
    return _signing(args, change, roles=_SIGNS_TARGETS, audience=audience)


def _rollback(args: argparse.Namespace) -> dict[str, Any]:
    audience = _audience(args)

    def change(repo: FleetRepository) -> dict[str, Any]:
        if args.name not in repo.published:
            raise LookupError(f"adapter {args.name!r} was never published here; published: "
                              f"{sorted(repo.published) or 'none'}")
        spec = repo.rollback(args.name, to_version=args.to, audience=audience)
        return {"adapter": spec.adapter, "version": spec.version, "content_of": args.to}
    return _signing(args, change, roles=_SIGNS_TARGETS, audience=audience)


_SIGNS_ROOT = ("root", *_SIGNS_TARGETS)


def _rotate(args: argparse.Namespace) -> dict[str, Any]:
    kid = open_repo(args, new_key_dir=True).resolve_keyid(args.role, args.keyid)
    extra = [args.key_dir[0]] if args.key_dir else []

    def change(repo: FleetRepository) -> dict[str, Any]:
        new = repo.rotate_key(args.role, kid, key_dir=args.key_dir[0] if args.key_dir else None)
        return {"role": args.role, "revoked": kid, "new_keyid": new,
                "root_version": repo.load("root").signed.version}
    return _signing(args, change, roles=_SIGNS_ROOT, key_dirs=extra, new_key_dir=True)


def _revoke(args: argparse.Namespace) -> dict[str, Any]:
    kid = open_repo(args).resolve_keyid(args.role, args.keyid)

    def change(repo: FleetRepository) -> dict[str, Any]:
        repo.revoke_key(args.role, kid)
        return {"role": args.role, "revoked": kid, "root_version": repo.load("root").signed.version}
    return _signing(args, change, roles=_SIGNS_ROOT)


#: what re-signing a role's expiry signs (the roles below it are signed again with it)
_EXPIRY_SIGNS = {"root": _SIGNS_ROOT, "targets": _SIGNS_TARGETS, "snapshot": ("snapshot", "timestamp"),
                 "timestamp": ("timestamp",)}


def _expiry(args: argparse.Namespace) -> dict[str, Any]:
    if args.seconds <= 0:
        raise ValueError(f"seconds must be positive, got {args.seconds}")

    def change(repo: FleetRepository) -> dict[str, Any]:
        repo.set_expiry(args.role, args.seconds)
        return {"role": args.role, "expires": str(repo.load(args.role).signed.expires)}
    return _signing(args, change, roles=_EXPIRY_SIGNS[args.role])


def _keys(args: argparse.Namespace) -> dict[str, Any]:
    repo = open_repo(args)
    root = repo.load("root").signed
    roles: dict[str, Any] = {}
    for role in _ROLES:
        r = root.roles[role]
        roles[role] = {"threshold": r.threshold, "keyids": sorted(r.keyids),
                       "expires": str(repo.load(role).signed.expires)}
    roles["command"] = {"threshold": 1, "keyids": sorted(repo.command_keys()), "expires": None}
    return {"root_version": root.version, "roles": roles}


def _keys_table(d: dict[str, Any]) -> str:
    rows = [(role, r["threshold"], kid[:8], r["expires"]) for role, r in d["roles"].items() for kid in r["keyids"]]
    return f"root version {d['root_version']}\n" + table(("role", "threshold", "key id", "expires"), rows)


def _push_cmd(args: argparse.Namespace) -> dict[str, Any]:
    def change(repo: FleetRepository) -> dict[str, Any]:
        repo.refresh_timestamp()
        return {"timestamp_version": repo.load("timestamp").signed.version}
    return _signing(args, change, roles=("timestamp",))


def _command(args: argparse.Namespace) -> dict[str, Any]:
    action = args.action.replace("-", "_")
    if action != "train_now" and not args.adapter:
        raise ValueError(f"{args.action} needs --adapter")
    if action == "rollback" and (args.version is None or args.version < 1):
        raise ValueError("rollback needs --version N (the device's local version to serve, >= 1)")
    check_broker_args(args)
    repo = open_repo(args)
    repo.check_signing_keys(("command",))
    t = connect_broker(args)
    try:
        view = fleet_view(t, args.timeout)
        st = view.status.get(args.device_id)
        if st is None and args.device_id not in view.online and args.device_id not in view.errors:
            raise LookupError(f"unknown device {args.device_id!r}: no status on the broker; known: "
                              f"{', '.join(sorted(view.status)) or 'none'}")
        if args.adapter and st is not None:
            known = set(st.adapters) | set(st.epsilon) | set(repo.published)
            if args.adapter not in known:
                raise LookupError(f"unknown adapter {args.adapter!r} for {args.device_id}: it serves "
                                  f"{sorted(st.adapters) or 'none'}, the repository published "
                                  f"{sorted(repo.published) or 'none'}")
        raw = repo.send_command(t, args.device_id, action, adapter=args.adapter, version=args.version)
        cmd = json.loads(raw)["command"]
        out: dict[str, Any] = {"device": args.device_id, "action": cmd["action"], "adapter": cmd["adapter"],
                               "seq": cmd["seq"], "result": "sent"}
        if args.wait:
            def answered(v: FleetView) -> bool:
                s = v.status.get(args.device_id)
                return s is not None and (s.last_command or {}).get("seq") == cmd["seq"]
            if not view.wait_for(answered, args.timeout):
                raise CliError(EXIT_BROKER, f"sent, but {args.device_id} did not answer within {args.timeout} s")
            res = view.status[args.device_id].last_command or {}
            out.update(result=res.get("result"), message=res.get("message"))
            if res.get("result") != "done":
                raise CliError(EXIT_REFUSED, f"{args.device_id}: {res.get('result')} {res.get('reason') or ''}"
                                             f" {res.get('message') or ''}".strip())
        return out
    finally:
        t.close()


def _status_rows(devices: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for dev, d in sorted(devices.items()):
        if "error" in d:  # its status could not be read: one row that says why
            rows.append((dev, d.get("online"), None, None, None, None, f"unreadable status: {d['error']}"))
            continue
        last = d.get("last_update") or {}
        lu = [str(last[k]) for k in ("result", "adapter", "reason") if last.get(k)]
        names = sorted(set(d.get("adapters", {})) | set(d.get("epsilon", {}))) or [None]
        for n in names:
            a = d.get("adapters", {}).get(n, {}) if n else {}
            eps = a.get("privacy_epsilon", d.get("epsilon", {}).get(n)) if n else None
            rows.append((dev, d.get("online"), n, a.get("fleet_version"), a.get("version"), eps,
                         " ".join(lu) or None))
    return rows


def _status_table(d: dict[str, Any]) -> str:
    text = table(("device", "online", "adapter", "fleet v", "local v", "epsilon", "last update"),
                 _status_rows(d["devices"]))
    bad = d.get("unreadable") or []
    if bad:
        text += f"\n\n{len(bad)} device(s) sent a status that cannot be read: {', '.join(bad)}"
    return text


def _status(args: argparse.Namespace) -> dict[str, Any]:
    """Every device's status; one whose status cannot be read is an entry with ``error``
    (listed in ``unreadable``), and the command still exits 0."""
    if args.watch is not None and args.watch <= 0:
        raise ValueError(f"--watch must be > 0 seconds, got {args.watch:g}")
    t = connect_broker(args)
    try:
        closed: list[BaseException] = []  # the reader went away (| head): stop watching

        def say(line: dict[str, Any]) -> None:
            if args.watch and not closed:
                try:
                    print(json.dumps(line, sort_keys=True), flush=True)
                except BrokenPipeError as e:
                    closed.append(e)

        def show(device: str, st: DeviceStatus | None, online: bool | None) -> None:
            say({"device": device, "online": online} if st is None else json.loads(st.encode()))

        def show_error(device: str, why: str) -> None:
            say({"device": device, "error": why})
        view = fleet_view(t, args.timeout, on_change=show, on_error=show_error)
        if args.watch:
            until = time.monotonic() + args.watch
            while not closed and time.monotonic() < until:
                view.wait_for(lambda v: bool(closed), min(0.5, until - time.monotonic()))
                if _reader_gone():  # between changes too: `| head -n 1` ends it at once
                    closed.append(BrokenPipeError("stdout's reader went away"))
            if closed:
                raise closed[0]
        statuses, errors = view.snapshot(), view.error_snapshot()
        devices: dict[str, dict[str, Any]] = {
            d: {"online": view.online.get(d), **json.loads(s.encode())} for d, s in statuses.items()}
        for d, why in errors.items():
            devices[d] = {"online": view.online.get(d), "device_id": d, "error": why}
        for d, on in view.online.items():
            devices.setdefault(d, {"online": on, "device_id": d, "adapters": {}, "epsilon": {}})
        return {"devices": devices, "unreadable": sorted(errors)}
    finally:
        t.close()


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (POLLERR on its write end)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (a test's capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _broker_init(args: argparse.Namespace) -> dict[str, Any]:
    from .broker_setup import device_ota_section, init_broker
    devices: dict[str, tuple[str, ...]] = {}
    for spec in args.device or ():
        name, _, groups = spec.partition("=")
        devices[name] = tuple(g for g in groups.split(",") if g)
    if args.devices:
        if args.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {args.devices}")
        width = max(3, len(str(args.devices)))
        for i in range(1, args.devices + 1):
            devices.setdefault(f"{args.prefix}{i:0{width}d}", tuple(args.groups or ()))
    layout = init_broker(args.dir, devices, host=args.host, port=args.port, fleet_port=args.fleet_port,
                         server_names=args.server_name or (), max_packet=args.max_packet, days=args.days)
    out = {"directory": str(layout.dir), "run": f"mosquitto -c {layout.conf}",
           "ports": {"devices": layout.port, "fleet": layout.fleet_port}, "fleet_args": layout.fleet_args(),
           "devices": {d: list(g) for d, g in layout.devices.items()}}
    if not args.quiet:
        out["ota_config"] = {d: device_ota_section(layout, d) for d in layout.devices}
    return out


def _broker_table(d: dict[str, Any]) -> str:
    import yaml
    lines = [f"broker configuration in {d['directory']}", f"run it:  {d['run']}",
             f"devices connect to port {d['ports']['devices']} (their user name is their client id), "
             f"the fleet tool to port {d['ports']['fleet']}",
             "fleet tool arguments:  " + " ".join(d["fleet_args"]), "",
             table(("device", "groups"), [(k, v) for k, v in d["devices"].items()])]
    for dev, section in d.get("ota_config", {}).items():
        lines += ["", f"# {dev}: /etc/lorad/lorad.yaml (copy ca.crt and clients/{dev}.* to /etc/lorad/mqtt/)",
                  yaml.safe_dump(section, sort_keys=False).rstrip()]
    return "\n".join(lines)


Command = Callable[[argparse.Namespace], "dict[str, Any] | str"]


def _wrap(fn: Command, fmt: Formatter) -> Callable[[argparse.Namespace, Any], int]:
    def handler(args: argparse.Namespace, ctx: Any = None) -> int:
        code, msg, data = _run(fn, args, fmt)
        if msg and getattr(args, "json", False):
            print(error_document(msg, code, data))
        elif msg:
            print(f"loractl fleet: {msg}", file=sys.stderr)
        return code
    return handler


def _run(fn: Command, args: argparse.Namespace, fmt: Formatter) -> tuple[int, str | None, dict[str, Any] | None]:
    """Exit code, error message and what ``--json`` shows with it. A closed stdout
    (BrokenPipeError) goes through to the command line's main, which ends quietly."""
    try:
        _emit(args, fn(args), fmt)
        return EXIT_OK, None, None
    except CliError as e:
        return e.code, str(e), e.data
    except TransportError as e:
        return EXIT_BROKER, f"broker: {e}", None
    except BrokenPipeError:
        raise
    except (OtaError, PermissionError, FileNotFoundError, FileExistsError, LookupError, RuntimeError) as e:
        return EXIT_REFUSED, str(e), None
    except (ValueError, AdapterError) as e:
        return EXIT_USAGE, str(e), None
    except OSError as e:
        return EXIT_REFUSED, f"{type(e).__name__}: {e}", None
    except KeyboardInterrupt:
        return 130, "interrupted", None
    except Exception as e:
        # the metadata libraries' own errors (a repository edited by hand, a damaged key file)
        if type(e).__module__.split(".")[0] in ("tuf", "securesystemslib", "cryptography"):
            return EXIT_REFUSED, f"repository metadata or keys: {type(e).__name__}: {e}", None
        raise


def add_publish_args(p: argparse.ArgumentParser, *, adapter_dir: bool = True) -> None:
    """What ``fleet publish`` takes: the adapter, its model, its audience, delta options."""
    add_adapter_args(p, adapter_dir=adapter_dir)
    _audience_args(p)
    p.add_argument("--delta-from", type=int, help="send a delta against this published version")
    p.add_argument("--delta-only", action="store_true",
                   help="with --delta-from: do not also sign the full payload for devices lacking the base")


def publish_dir(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """``fleet publish`` of the PEFT directory ``directory`` with the other options of ``args``."""
    return _publish(argparse.Namespace(**{**vars(args), "adapter": directory, "privacy_record": None}))


Leaf = Callable[..., argparse.ArgumentParser]


def register(sub: argparse._SubParsersAction, *, model_loader: ModelLoader | None = None,
             extend: Callable[[Leaf], None] | None = None) -> None:
    """Add ``fleet`` and its subcommands to loractl's (or any) subparsers.

    ``model_loader`` reads a device config's model section for ``publish --config`` (and
    ``rollout create --config``). ``extend(leaf)`` adds more subcommands made the same way
    (loractl's ``fleet federate``, which needs the daemon's Flower apps).
    """
    fleet = sub.add_parser("fleet", help="fleet OTA: root of trust, publish, keys, commands, status, rollouts",
                           description="Operate the fleet's signed adapter updates over MQTT. Exit codes: " +
                           "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    fleet.set_defaults(model_loader=model_loader)
    # JSON usage errors under `fleet` whatever parser class loractl's root is (with --json
    # after the command; before `fleet`, the root parser must be a JsonErrorParser too)
    fs = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND",
                              parser_class=JsonErrorParser)

    def leaf(name: str, fn: Command, help: str, *,
             repo: bool = True, broker: bool = False, fmt: Formatter = _kv,
             parent: Any = fs, signs: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        if repo:
            p.add_argument("repo", type=Path, metavar="REPO_DIR", help="fleet repository directory")
            p.add_argument("--key-dir", type=Path, action="append",
                           help="directory with private keys (offline media; repeatable)")
        if broker:
            add_broker_args(p)
            if repo and signs:
                p.add_argument("--no-push", action="store_true", help="sign only; publish later")
            p.set_defaults(no_push=False)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
        p.set_defaults(handler=_wrap(fn, fmt))
        return p

    p = leaf("init", _init, "create the root of trust: keys and first metadata")
    p.add_argument("--threshold", action="append", metavar="ROLE=N", help="signatures needed (default root=2)")
    p.add_argument("--keys", action="append", metavar="ROLE=N", help="keys per role (default root=3, targets=2)")
    p.add_argument("--expiry", action="append", metavar="ROLE=SECONDS", help="expiry period per role")

    p = leaf("publish", _publish, "sign and publish an adapter version", broker=True)
    add_publish_args(p)

    p = leaf("rollback", _rollback, "roll an audience back: a higher version with an older adapter", broker=True)
    p.add_argument("--name", required=True)
    p.add_argument("--to", type=int, required=True, help="published version whose adapter to serve again")
    _audience_args(p)

    for name, fn, what in (("rotate", _rotate, "replace a key by a new one (new root version)"),
                           ("revoke", _revoke, "remove a key (the role keeps its threshold)")):
        p = leaf(name, fn, what, broker=True)
        p.add_argument("role", choices=(*_ROLES, "command") if name == "rotate" else _ROLES)
        p.add_argument("keyid", help="key id or any unique prefix of it (key file names show 8 characters)")

    p = leaf("expiry", _expiry, "set a role's expiry period and re-sign it", broker=True)
    p.add_argument("role", choices=_ROLES)
    p.add_argument("seconds", type=int)

    leaf("keys", _keys, "show roles, key ids, thresholds and expiry", fmt=_keys_table)
    leaf("push", _push_cmd, "re-sign the timestamp and publish what devices need", broker=True, signs=False)

    p = leaf("command", _command, "send a signed command to a device", broker=True, signs=False)
    p.add_argument("device_id")
    p.add_argument("action", choices=("load", "pin", "unpin", "evict", "train-now", "rollback", "remove"))
    p.add_argument("--adapter")
    p.add_argument("--version", type=int, help="for rollback: the device's local version to serve")
    p.add_argument("--wait", action="store_true", help="wait for the device's answer (exit 1 if it refuses)")

    p = leaf("status", _status, "show (or --watch) every device's retained status", repo=False, broker=True,
             fmt=_status_table)
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print changes live for this long")

    broker = fs.add_parser("broker", help="set up the fleet's Mosquitto", description="set up the fleet's Mosquitto")
    bs = broker.add_subparsers(dest="broker_command", required=True, metavar="BROKER_COMMAND")
    p = leaf("init", _broker_init, "write CA, certificates, passwords, ACLs and mosquitto.conf for a fleet",
             repo=False, fmt=_broker_table, parent=bs)
    p.add_argument("dir", type=Path, metavar="DIR", help="directory to create (mosquitto -c DIR/mosquitto.conf)")
    p.add_argument("--devices", type=int, help="this many devices, named PREFIX001...")
    p.add_argument("--prefix", default="dev", help="name prefix for --devices (default dev)")
    p.add_argument("--groups", type=lambda s: [g for g in s.split(",") if g], help="groups of the --devices ones")
    p.add_argument("--device", action="append", metavar="NAME[=G1,G2]", help="a device and its groups (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address the broker listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8883, help="the devices' port (default 8883)")
    p.add_argument("--fleet-port", type=int, help="the fleet tool's port (default --port + 1)")
    p.add_argument("--server-name", action="append", help="DNS name or IP in the server certificate (repeatable)")
    p.add_argument("--max-packet", type=int, default=1 << 20, help="broker's max_packet_size, bytes")
    p.add_argument("--days", type=int, default=365, help="certificate validity")
    p.add_argument("--quiet", action="store_true", help="omit the per-device ota: sections")

    from .rollout_cli import register_rollout
    register_rollout(fs, leaf, add_broker_args)
    if extend is not None:
        extend(leaf)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorad.ota.cli``: the fleet commands without the daemon's CLI."""
    parser = JsonErrorParser(prog="loractl")
    parser.add_argument("--json", action="store_true", help="JSON output")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        try:
            args = parser.parse_args(argv)
            return int(args.handler(args, None))
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (| head): quiet, and Python's own flush at exit too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
