"""``loractl fleet ...``: the fleet operator's tools (root of trust, publish, keys, status).

:func:`register` has the signature of a ``loractl`` command group (``daemon.ctl.GROUPS``);
its handlers take ``(args, ctx)`` and ignore the daemon connection. ``python -m ota.cli``
runs the same commands without the daemon's CLI.

Exit codes as loractl: 0 ok, 1 refused (verification, key or repository error), 2 usage,
3 cannot reach the broker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adapters.errors import AdapterError
from adapters.lora import LoraAdapter

from .errors import OtaError, TransportError
from .files import RepoIndex, RepoReader
from .repository import FleetRepository, RepoSettings
from .status import FleetView
from .target import Audience, ProbeSet
from .transport import MqttConfig, MqttTransport

__all__ = ["register", "main", "ModelSection"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3
_ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class ModelSection:
    """What ``publish`` needs of a device's ``model:`` section (``--config lorad.yaml``)."""

    path: Path
    targets: tuple[str, ...]
    rank: int
    weight_names: Mapping[str, str] = field(default_factory=dict)


#: Reads the model section of a device config file; the daemon's CLI provides it (ota/
#: does not import the daemon). It raises ValueError naming the key that is wrong.
ModelLoader = Callable[[Path], ModelSection]


def _role_map(items: Sequence[str] | None, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or ():
        role, _, value = item.partition("=")
        if role not in _ROLES or not value.isdigit():
            raise ValueError(f"{what} {item!r}: expected ROLE=N with ROLE one of {_ROLES}")
        out[role] = int(value)
    return out


def _broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker (mutual TLS)")
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker address")
    g.add_argument("--ca", type=Path, help="CA certificate file")
    g.add_argument("--cert", type=Path, help="client certificate file")
    g.add_argument("--key", type=Path, help="client private key file")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-file", type=Path, help="file holding the broker password")


def _audience_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="every device")
    g.add_argument("--group", action="append", help="a device group (repeatable)")
    g.add_argument("--device", action="append", help="a device id (repeatable)")


def _audience(args: argparse.Namespace) -> Audience:
    return Audience(devices=tuple(args.device or ()), groups=tuple(args.group or ()), everyone=args.all)


def _connect(args: argparse.Namespace) -> MqttTransport:
    if not args.broker or not args.ca or not args.cert or not args.key:
        raise ValueError("--broker, --ca, --cert and --key are needed to reach the broker")
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    password = args.password_file.read_text().strip() if args.password_file else None
    t = MqttTransport(MqttConfig(host=host, port=int(port), client_id=f"loractl-fleet-{uuid.uuid4().hex[:8]}",
                                 ca_file=args.ca, cert_file=args.cert, key_file=args.key,
                                 username=args.username, password=password))
    t.connect()
    return t


def _repo(args: argparse.Namespace) -> FleetRepository:
    key_dirs = [*args.key_dir] if args.key_dir else None
    if key_dirs is not None:
        key_dirs.append(args.repo / "keys")
    return FleetRepository(args.repo, key_dirs=key_dirs)


def _push(args: argparse.Namespace, repo: FleetRepository) -> dict[str, Any]:
    if args.no_push:
        return {"pushed": False}
    t = _connect(args)
    try:
        try:
            current: RepoIndex | None = RepoReader(t, timeout_s=2.0).index()
        except TransportError:
            current = None  # an empty broker: everything is new
        index = repo.push(t, current=current)
    finally:
        t.close()
    return {"pushed": True, "files": len(index.files)}


def _emit(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, sort_keys=True))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


# --- commands ----------------------------------------------------------------------

def _init(args: argparse.Namespace) -> dict[str, Any]:
    d = RepoSettings.default()
    settings = RepoSettings(thresholds={**d.thresholds, **_role_map(args.threshold, "--threshold")},
                            key_counts={**d.key_counts, **_role_map(args.keys, "--keys")},
                            expiry_s={**d.expiry_s, **_role_map(args.expiry, "--expiry")})
    repo = FleetRepository.init(args.repo, settings=settings, key_dir=args.key_dir[0] if args.key_dir else None)
    return {"repository": str(repo.dir), "trusted_root": str(repo.dir / "metadata" / "1.root.json")}


def _model_section(args: argparse.Namespace) -> ModelSection | None:
    if args.config is not None:
        if args.base_model is not None or args.targets is not None or args.rank is not None:
            raise ValueError("--config gives the model, its targets and rank: drop --base-model, --targets and --rank")
        loader: ModelLoader | None = args.model_loader
        if loader is None:
            raise ValueError("--config needs loractl (python -m ota.cli cannot read lorad.yaml): use --base-model")
        return loader(args.config)
    if args.base_model is None:
        return None
    return ModelSection(path=args.base_model, targets=tuple(args.targets or ("*",)), rank=args.rank or 8)


def _engine(section: ModelSection) -> Any:
    from adapters.engine import InferenceEngine

    if not section.path.is_file():
        raise ValueError(f"base model {str(section.path)!r} does not exist")
    try:
        return InferenceEngine(section.path, targets=section.targets, rank=section.rank,
                               weight_names=section.weight_names)
    except ValueError as e:  # targets or weight_names that do not fit the graph
        raise ValueError(f"model targets {list(section.targets)} do not fit {str(section.path)!r}: {e}") from e
    except AdapterError:
        raise
    except Exception as e:  # onnx/protobuf/ORT raise their own untyped errors for a bad file
        raise ValueError(f"base model {str(section.path)!r} cannot be loaded: {type(e).__name__}: {e}") from e


def _load_adapter(args: argparse.Namespace) -> tuple[LoraAdapter, ProbeSet | None]:
    from adapters.peft_format import load_peft, read_peft_dir
    section = _model_section(args)
    files = read_peft_dir(args.adapter)
    probes = None
    if section is not None:
        # The device's mapping: PEFT module names are matched as the device will match them.
        engine = _engine(section)
        adapter = load_peft(files, weight_of=engine.module_paths.weight_of)
        engine.check(adapter)
        adapter = LoraAdapter(rank=adapter.rank, alpha=adapter.alpha, weights=adapter.weights,
                              base_fingerprint=engine.fingerprint, use_rslora=adapter.use_rslora,
                              extra=adapter.extra)
        rng = np.random.default_rng(0)
        # Integer inputs are ones: a valid token id, and an attention mask that keeps every
        # position (an all-zero mask divides by zero in mean pooling).
        inputs = {s.name: (rng.random([2 if d < 0 else d for d in s.shape]).astype(s.numpy_dtype)
                           if s.datatype.startswith("FP") else
                           np.ones([2 if d < 0 else d for d in s.shape], s.numpy_dtype))
                  for s in engine.inputs}
        outputs = engine.run(inputs, engine.prepare(adapter, name=args.name, version=0))
        bad = sorted(name for name, value in outputs.items() if not np.all(np.isfinite(value)))
        if bad:
            raise ValueError(f"the health-check probe gives non-finite outputs {bad} on this model with the adapter; "
                             "the devices could never pass it")
        probes = ProbeSet(inputs=inputs, outputs=outputs, atol=args.probe_atol, rtol=args.probe_rtol)
    else:
        adapter = load_peft(files)
        if args.base_fingerprint:
            adapter = LoraAdapter(rank=adapter.rank, alpha=adapter.alpha, weights=adapter.weights,
                                  base_fingerprint=args.base_fingerprint, use_rslora=adapter.use_rslora,
                                  extra=adapter.extra)
    if not adapter.base_fingerprint:
        raise ValueError("the adapter records no base model: give --config (the device's lorad.yaml), "
                         "--base-model (also records the health-check probes) or --base-fingerprint")
    return adapter, probes


def _publish(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    adapter, probes = _load_adapter(args)
    spec = repo.publish_adapter(args.name, adapter, audience=_audience(args), probes=probes,
                                delta_from=args.delta_from, dtype="fp16" if args.fp16 else "fp32",
                                compression=args.compress, chunk_size=args.chunk_size)
    return {"adapter": spec.adapter, "version": spec.version, "bytes": spec.length,
            "encoding": spec.encoding, "audience": spec.audience.label, **_push(args, repo)}


def _rollback(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    spec = repo.rollback(args.name, to_version=args.to, audience=_audience(args))
    return {"adapter": spec.adapter, "version": spec.version, "content_of": args.to, **_push(args, repo)}


def _rotate(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    new = repo.rotate_key(args.role, args.keyid, key_dir=args.key_dir[0] if args.key_dir else None)
    return {"role": args.role, "revoked": args.keyid, "new_keyid": new,
            "root_version": repo.load("root").signed.version, **_push(args, repo)}


def _revoke(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    repo.revoke_key(args.role, args.keyid)
    return {"role": args.role, "revoked": args.keyid, "root_version": repo.load("root").signed.version,
            **_push(args, repo)}


def _expiry(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    repo.set_expiry(args.role, args.seconds)
    return {"role": args.role, "expires": str(repo.load(args.role).signed.expires), **_push(args, repo)}


def _keys(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    root = repo.load("root").signed
    out: dict[str, Any] = {"root_version": root.version}
    for role in _ROLES:
        r = root.roles[role]
        out[role] = {"threshold": r.threshold, "keyids": sorted(r.keyids),
                     "expires": str(repo.load(role).signed.expires)}
    out["command"] = sorted(repo.command_keys())
    return out


def _push_cmd(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    repo.refresh_timestamp()
    return _push(args, repo)


def _command(args: argparse.Namespace) -> dict[str, Any]:
    repo = _repo(args)
    t = _connect(args)
    try:
        raw = repo.send_command(t, args.device_id, args.action.replace("-", "_"),
                                adapter=args.adapter, version=args.version)
    finally:
        t.close()
    return {"sent": json.loads(raw)["command"]}


def _status(args: argparse.Namespace) -> dict[str, Any]:
    t = _connect(args)
    try:
        def show(device: str, st: Any, online: bool | None) -> None:
            if args.watch:
                line = {"device": device, "online": online} if st is None else json.loads(st.encode())
                print(json.dumps(line, sort_keys=True), flush=True)
        view = FleetView(t, on_change=show)
        time.sleep(args.watch if args.watch else 1.0)
        return {d: {"online": view.online.get(d), **json.loads(s.encode())} for d, s in view.status.items()}
    finally:
        t.close()


def _wrap(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace, Any], int]:
    def handler(args: argparse.Namespace, ctx: Any = None) -> int:
        try:
            _emit(args, fn(args))
            return EXIT_OK
        except TransportError as e:
            print(f"loractl fleet: cannot reach the broker: {e}", file=sys.stderr)
            return EXIT_CONNECT
        except (OtaError, AdapterError, PermissionError, FileNotFoundError, FileExistsError, RuntimeError) as e:
            print(f"loractl fleet: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except ValueError as e:
            print(f"loractl fleet: {e}", file=sys.stderr)
            return EXIT_USAGE
    return handler


def register(sub: argparse._SubParsersAction, *, model_loader: ModelLoader | None = None) -> None:
    """Add ``fleet`` and its subcommands to loractl's (or any) subparsers.

    ``model_loader`` reads a device config's model section for ``publish --config``.
    """
    fleet = sub.add_parser("fleet", help="fleet OTA: root of trust, publish, keys, commands, status",
                           description="Operate the fleet's signed adapter updates over MQTT.")
    fs = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    def leaf(name: str, fn: Callable[[argparse.Namespace], dict[str, Any]], help: str, *,
             repo: bool = True, broker: bool = False) -> argparse.ArgumentParser:
        p = fs.add_parser(name, help=help, description=help)
        if repo:
            p.add_argument("repo", type=Path, metavar="REPO_DIR", help="fleet repository directory")
            p.add_argument("--key-dir", type=Path, action="append",
                           help="directory with private keys (offline media; repeatable)")
        if broker:
            _broker_args(p)
            if repo:
                p.add_argument("--no-push", action="store_true", help="sign only; publish later")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
        p.set_defaults(handler=_wrap(fn))
        return p

    p = leaf("init", _init, "create the root of trust: keys and first metadata")
    p.add_argument("--threshold", action="append", metavar="ROLE=N", help="signatures needed (default root=2)")
    p.add_argument("--keys", action="append", metavar="ROLE=N", help="keys per role (default root=3, targets=2)")
    p.add_argument("--expiry", action="append", metavar="ROLE=SECONDS", help="expiry period per role")

    p = leaf("publish", _publish, "sign and publish an adapter version", broker=True)
    p.add_argument("--name", required=True, help="adapter name on the devices")
    p.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    _audience_args(p)
    p.add_argument("--config", type=Path, metavar="LORAD_YAML",
                   help="the devices' lorad.yaml: its model section (path, targets, rank, weight_names) gives "
                        "the base model, the PEFT name mapping and the fingerprint")
    p.add_argument("--base-model", type=Path, help="base ONNX model: records fingerprint and health probes")
    p.add_argument("--targets", nargs="+", help="LoRA target patterns of --base-model (default: all)")
    p.add_argument("--rank", type=int, help="slot rank of --base-model's LoRA graph (default 8)")
    p.set_defaults(model_loader=model_loader)
    p.add_argument("--base-fingerprint", help="base model fingerprint when --base-model is not given")
    p.add_argument("--probe-atol", type=float, default=ProbeSet.atol, help="health-check absolute tolerance")
    p.add_argument("--probe-rtol", type=float, default=ProbeSet.rtol, help="health-check relative tolerance")
    p.add_argument("--delta-from", type=int, help="send a delta against this published version")
    p.add_argument("--fp16", action="store_true", help="send tensors as fp16")
    p.add_argument("--compress", choices=("none", "zlib", "zstd"), default="zstd")
    p.add_argument("--chunk-size", type=int, default=8 * 1024, help="bytes per MQTT message")

    p = leaf("rollback", _rollback, "roll an audience back: a higher version with an older adapter", broker=True)
    p.add_argument("--name", required=True)
    p.add_argument("--to", type=int, required=True, help="published version whose adapter to serve again")
    _audience_args(p)

    for name, fn, what in (("rotate", _rotate, "replace a key by a new one (new root version)"),
                           ("revoke", _revoke, "remove a key (the role keeps its threshold)")):
        p = leaf(name, fn, what, broker=True)
        p.add_argument("role", choices=(*_ROLES, "command") if name == "rotate" else _ROLES)
        p.add_argument("keyid")

    p = leaf("expiry", _expiry, "set a role's expiry period and re-sign it", broker=True)
    p.add_argument("role", choices=_ROLES)
    p.add_argument("seconds", type=int)

    leaf("keys", _keys, "show roles, key ids, thresholds and expiry")
    leaf("push", _push_cmd, "re-sign the timestamp and publish what devices need", broker=True)

    p = leaf("command", _command, "send a signed command to a device", broker=True)
    p.add_argument("device_id")
    p.add_argument("action", choices=("load", "pin", "unpin", "evict", "train-now", "rollback"))
    p.add_argument("--adapter")
    p.add_argument("--version", type=int, help="for rollback: the device's local version to serve")

    p = leaf("status", _status, "show (or --watch) every device's retained status", repo=False, broker=True)
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print changes live for this long")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loractl")
    parser.add_argument("--json", action="store_true", help="JSON output")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args, None))


if __name__ == "__main__":
    sys.exit(main())
