"""What every ``loractl fleet`` command shares: exit codes and :class:`CliError`, the broker
arguments and :class:`FleetSession`, the adapter arguments and :func:`load_adapter`
(PEFT files read with the devices' module names, checked, health probes recorded), tables.

:mod:`lorad.ota.cli` (the commands) and :mod:`lorad.ota.rollout_cli` (``fleet rollout``) both build on
it; neither imports the other's internals.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from lorad.adapters.errors import AdapterError

if TYPE_CHECKING:
    # Imported where used: registering the fleet commands (every loractl start) and the
    # commands that touch neither the broker nor an adapter load no numpy, tuf or paho.
    from lorad.adapters.lora import LoraAdapter

    from .config import MqttConfig
    from .files import RepoIndex
    from .repository import FleetRepository
    from .status import DeviceStatus, FleetView
    from .target import ProbeSet
    from .transport import MqttTransport, Transport

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_BROKER", "EXIT_HALTED", "EXIT_NOT_DONE", "EXIT_CODES",
           "CliError", "JsonErrorParser", "error_document", "ModelSection", "ModelLoader", "FleetSession",
           "add_broker_args", "add_adapter_args", "check_broker_args", "connect_broker", "open_repo", "load_adapter",
           "fleet_view", "fmt_value", "table"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_BROKER, EXIT_HALTED, EXIT_NOT_DONE = 0, 1, 2, 3, 4, 5
#: ``ProbeSet.atol`` and ``ProbeSet.rtol`` (lorad.ota.target), the defaults of ``--probe-atol``
#: and ``--probe-rtol``; not imported here: that module loads numpy, safetensors and zstandard
#: on every loractl start (tests/unit/test_startup_imports.py keeps the numbers equal).
PROBE_ATOL, PROBE_RTOL = 1e-4, 1e-3
EXIT_CODES: Mapping[int, str] = {
    EXIT_OK: "done", EXIT_REFUSED: "refused (verification, keys, repository, unknown device/group/adapter/key)",
    EXIT_USAGE: "bad or missing arguments or input files", EXIT_BROKER: "broker unreachable, refused or failed",
    EXIT_HALTED: "rollout halted at its abort threshold",
    EXIT_NOT_DONE: "rollout not done: paused, or still running at --max-time"}


class CliError(Exception):
    """A failure with its exit code and the message the operator sees (``data``: what
    ``--json`` shows beside the error, e.g. the rollout's summary)."""

    def __init__(self, code: int, message: str, *, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = dict(data or {})


def error_document(message: str, code: int, data: Mapping[str, Any] | None = None) -> str:
    """The error of every lorad command line in ``--json`` mode (``lorad.daemon.ctl.output.fail``),
    with what the command has to say beside it."""
    return json.dumps({**(data or {}), "error": message, "exit_code": code, "status": None}, sort_keys=True)


class JsonErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are the JSON error document when ``--json`` was
    given (anywhere before ``--``, on this parser's command line or its parent's), and the
    usual usage text and message on stderr otherwise; the exit code is 2 either way."""

    #: set while the outermost parser parses: whether its command line asked for JSON
    _json: ClassVar[contextvars.ContextVar[bool]] = contextvars.ContextVar("lorad_json_errors", default=False)

    @contextlib.contextmanager
    def _asked(self, argv: list[str]) -> Iterator[None]:
        wants = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
        token = self._json.set(self._json.get() or wants)
        try:
            yield
        finally:
            self._json.reset(token)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        with self._asked(argv):
            return super().parse_known_args(argv, namespace)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        with self._asked(argv):  # "unrecognized arguments" is reported here, after parse_known_args
            return super().parse_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        if self._json.get():
            print(error_document(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_USAGE))
            self.exit(EXIT_USAGE)
        super().error(message)


@dataclass(frozen=True)
class ModelSection:
    """What ``publish`` needs of a device's ``model:`` section (``--config lorad.yaml``)."""

    path: Path
    targets: tuple[str, ...]
    rank: int
    weight_names: Mapping[str, str] = field(default_factory=dict)
    #: ``model.quantized_compute``: how a quantised base computes, so probes match the device's.
    quantized_compute: str = "int8"


#: Reads the model section of a device config file; the daemon's CLI provides it (ota/
#: does not import the daemon). It raises ValueError naming the key that is wrong.
ModelLoader = Callable[[Path], ModelSection]


def add_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker (mutual TLS)")
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker address")
    g.add_argument("--ca", type=Path, help="CA certificate file")
    g.add_argument("--cert", type=Path, help="client certificate file")
    g.add_argument("--key", type=Path, help="client private key file")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-file", type=Path, help="file holding the broker password")
    g.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the broker's answers (default 10)")


def check_broker_args(args: argparse.Namespace) -> None:
    """Usage error (ValueError) for any bad broker argument, before anything slow happens
    (a model loaded, keys read); nothing when the command does not push (``--no-push``)."""
    if not getattr(args, "no_push", False):
        _mqtt_config(args)


def _mqtt_config(args: argparse.Namespace) -> MqttConfig:
    """Check every broker argument (before anything is signed)."""
    missing = [f"--{n.replace('_', '-')}" for n in ("broker", "ca", "cert", "key") if not getattr(args, n)]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: --broker, --ca, --cert and --key are needed "
                         f"to reach the broker (or --no-push to sign only)")
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    for flag in ("ca", "cert", "key", "password_file"):
        f = getattr(args, flag)
        if f is not None and not Path(f).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {f}: no such file")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    from .config import MqttConfig  # pydantic's too: only for the commands that reach the broker

    password = args.password_file.read_text().strip() if args.password_file else None
    if password is not None and args.username is None:
        raise ValueError("--password-file needs --username")
    return MqttConfig(host=host, port=int(port), client_id=f"loractl-fleet-{uuid.uuid4().hex[:8]}",
                      ca_file=args.ca, cert_file=args.cert, key_file=args.key,
                      username=args.username, password=password, timeout_s=args.timeout)


def connect_broker(args: argparse.Namespace) -> MqttTransport:
    from .transport import MqttTransport

    t = MqttTransport(_mqtt_config(args))
    t.connect()
    return t


def open_repo(args: argparse.Namespace, *, new_key_dir: bool = False) -> FleetRepository:
    """The repository at ``args.repo``, signing with the keys in ``--key-dir`` (each must be
    a directory holding private keys of this repository: a wrong one is an error, never
    silently passed over for ``REPO/keys``) and in ``REPO/keys``. ``new_key_dir``: the first
    ``--key-dir`` receives a new key (``rotate``) and may hold none yet."""
    from .repository import FleetRepository

    repo = FleetRepository(args.repo)
    given: list[Path] = [*(getattr(args, "key_dir", None) or ())]
    for i, d in enumerate(given):
        if not d.is_dir():
            raise ValueError(f"--key-dir {d}: no such directory (name the directory, e.g. the mounted offline "
                             "media, that holds the private keys)")
        if new_key_dir and i == 0:
            continue
        if not repo.keys_in(d):
            from .keys import key_files

            others = len(key_files(d))
            raise ValueError(f"--key-dir {d} holds no private key of the repository {args.repo} "
                             f"({others} other key file(s)): name the directory that holds this repository's "
                             "keys (`loractl fleet keys REPO` lists their ids; key files are <role>.<id>.key)")
    if given:
        repo.key_dirs = [*given, *([] if args.repo / "keys" in given else [args.repo / "keys"])]
    return repo


class FleetSession:
    """A fleet tool's broker connection and the repository index found there (read
    before anything is signed; None when the broker holds none yet)."""

    def __init__(self, transport: Transport, *, timeout_s: float = 10.0) -> None:
        from .files import RepoReader

        self.transport = transport
        try:
            self.index: RepoIndex | None = RepoReader(transport, timeout_s=timeout_s).index_if_any()
        except BaseException:
            transport.close()
            raise

    @classmethod
    def connect(cls, args: argparse.Namespace) -> FleetSession:
        return cls(connect_broker(args), timeout_s=args.timeout)

    def push(self, repo: FleetRepository) -> dict[str, Any]:
        index = repo.push(self.transport, current=self.index)
        self.index = index
        return {"pushed": True, "files": len(index.files)}

    def close(self) -> None:
        self.transport.close()


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v) or "-"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) or "-"
    text = str(v)
    # what devices report reaches the operator's terminal: no control characters (escapes)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, a header line and a rule (what every list command prints)."""
    cells = [[fmt_value(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _model_section(args: argparse.Namespace) -> ModelSection | None:
    if args.config is not None:
        if args.base_model is not None or args.targets is not None or args.rank is not None:
            raise ValueError("--config gives the model, its targets and rank: drop --base-model, --targets and --rank")
        loader: ModelLoader | None = getattr(args, "model_loader", None)
        if loader is None:
            raise ValueError("--config needs loractl (python -m lorad.ota.cli cannot read lorad.yaml): use --base-model")
        return loader(args.config)
    if args.base_model is None:
        return None
    return ModelSection(path=args.base_model, targets=tuple(args.targets or ("*",)), rank=args.rank or 8)


def _engine(section: ModelSection) -> Any:
    from lorad.adapters.engine import InferenceEngine

    if not section.path.is_file():
        raise ValueError(f"base model {str(section.path)!r} does not exist")
    try:
        # The device's engine as its config makes it: probes recorded with another
        # quantized_compute would fail its health check.
        return InferenceEngine(section.path, targets=section.targets, rank=section.rank,
                               weight_names=section.weight_names, quantized_compute=section.quantized_compute)
    except ValueError as e:  # targets or weight_names that do not fit the graph
        raise ValueError(f"model targets {list(section.targets)} do not fit {str(section.path)!r}: {e}") from e
    except AdapterError:
        raise
    except Exception as e:  # onnx/protobuf/ORT raise their own untyped errors for a bad file
        raise ValueError(f"base model {str(section.path)!r} cannot be loaded: {type(e).__name__}: {e}") from e


def load_adapter(args: argparse.Namespace) -> tuple[LoraAdapter, ProbeSet | None]:
    import numpy as np

    from lorad.adapters.lora import LoraAdapter
    from lorad.adapters.peft_format import load_peft, read_peft_dir

    from .target import ProbeSet

    section = _model_section(args)
    try:
        files = read_peft_dir(args.adapter)
        if section is None:  # otherwise read with the model's module names below
            adapter = load_peft(files)
    except (AdapterError, OSError, ValueError) as e:
        raise ValueError(f"--adapter {args.adapter}: not a PEFT adapter directory "
                         f"(adapter_config.json + adapter_model.safetensors): {e}") from e
    probes = None
    if section is not None:
        # The device's mapping: PEFT module names are matched as the device will match them.
        engine = _engine(section)
        try:
            adapter = load_peft(files, weight_of=engine.module_paths.weight_of)
            engine.check(adapter)
        except AdapterError as e:  # a valid adapter, but not one for this model
            raise CliError(EXIT_REFUSED, f"--adapter {args.adapter} does not fit {str(section.path)!r}: {e}") from e
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
    elif args.base_fingerprint:
        adapter = LoraAdapter(rank=adapter.rank, alpha=adapter.alpha, weights=adapter.weights,
                              base_fingerprint=args.base_fingerprint, use_rslora=adapter.use_rslora,
                              extra=adapter.extra)
    if not adapter.base_fingerprint:
        raise ValueError("the adapter records no base model: give --config (the device's lorad.yaml), "
                         "--base-model (also records the health-check probes) or --base-fingerprint")
    return adapter, probes


def fleet_view(transport: Transport, timeout_s: float,
               on_change: Callable[[str, DeviceStatus | None, bool | None], None] | None = None, *,
               on_error: Callable[[str, str], None] | None = None) -> FleetView:
    """Every device's retained status, complete (the broker's answer awaited); statuses
    that cannot be read are in the view's ``errors``."""
    from .status import FleetView
    from .transport import barrier

    view = FleetView(transport, on_change=on_change, on_error=on_error)
    barrier(transport, timeout_s)
    return view


def add_adapter_args(p: argparse.ArgumentParser, *, adapter_dir: bool = True) -> None:
    """``adapter_dir=False``: the command finds the PEFT directories itself (fleet federate)."""
    p.add_argument("--name", required=True, help="adapter name on the devices")
    if adapter_dir:
        p.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    p.add_argument("--config", type=Path, metavar="LORAD_YAML",
                   help="the devices' lorad.yaml: its model section (path, targets, rank, weight_names) gives "
                        "the base model, the PEFT name mapping and the fingerprint")
    p.add_argument("--base-model", type=Path, help="base ONNX model: records fingerprint and health probes")
    p.add_argument("--targets", nargs="+", help="LoRA target patterns of --base-model (default: all)")
    p.add_argument("--rank", type=int, help="slot rank of --base-model's LoRA graph (default 8)")
    p.add_argument("--base-fingerprint", help="base model fingerprint when --base-model is not given")
    p.add_argument("--probe-atol", type=float, default=PROBE_ATOL, help="health-check absolute tolerance")
    p.add_argument("--probe-rtol", type=float, default=PROBE_RTOL, help="health-check relative tolerance")
    p.add_argument("--privacy-record", type=Path,
                   help="DP privacy record (default: lorad_privacy.json in --adapter, if present)")
    p.add_argument("--fp16", action="store_true", help="send tensors as fp16")
    p.add_argument("--compress", choices=("none", "zlib", "zstd"), default="zstd")
    p.add_argument("--chunk-size", type=int, default=8 * 1024, help="bytes per MQTT message")
