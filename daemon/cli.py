"""``lorad``: the daemon's command line.

``lorad serve`` runs the daemon (SIGHUP reloads the config and the adapters);
``lorad check-config FILE`` checks a config file as ``serve`` would at start (the model
opened, its targets matched, a text model's tokenizer loaded, OTA's files read) and prints
the effective settings (JSON; YAML with ``--print``, itself a valid config file);
``lorad config-schema`` prints the JSON Schema of the file; ``lorad inspect-model
MODEL.onnx`` lists the weights LoRA can target, with the module paths PEFT adapters name
them by; ``lorad import-model bert SRC OUT`` writes a Hugging Face BERT-family checkpoint
as a LoRA-ready ONNX text model, ``lorad import-model gguf SRC.gguf OUT`` a LLaMA-architecture
GGUF file as a LoRA-ready ONNX decoder (4-bit MatMulNBits, KV cache, tokenizer inside);
``lorad quantize-model IN OUT --weights int8|int4`` writes the base with its linear weights
(and, for int4, its embedding tables) quantised by ONNX Runtime's own quantiser, module paths
and metadata kept; ``lorad install-service`` installs the systemd unit,
user, directories and default config outside Yocto; ``lorad --version``. Exit codes: 0 ok,
1 the daemon failed at run time, 2 bad usage or configuration (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lorad.adapters.errors import AdapterError
from lorad.daemon.auth import AuthError
from lorad.daemon.config import Config, ConfigError, config_schema, load_config
from lorad.daemon.ctl.output import console_main, fail
from lorad.daemon.systemd import setup_logging
from lorad.daemon.version import lorad_version, ort_version
from lorad.trainer.errors import TrainerError

__all__ = ["main", "build_parser", "config_from_args", "effective_config"]

_log = logging.getLogger("lorad")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorad",
        description="Serve an ONNX base model with hot-swapped LoRA adapters (Open Inference Protocol over HTTP).",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", description="Run the daemon until SIGTERM/SIGINT. Flags override the config file.")
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML config file (default: built-in defaults)")
    serve.add_argument("--host", help="TCP address to bind (server.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port; 0 picks a free one, written to <state_dir>/lorad.addr (server.port, default 8080)")
    serve.add_argument("--state-dir", type=Path, metavar="DIR", help="state directory (state_dir; default $STATE_DIRECTORY or the per-user state dir)")
    serve.add_argument("--unix-socket", type=Path, metavar="PATH", help="also serve on this Unix socket (server.unix_socket)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log_level")

    check = sub.add_parser(
        "check-config", help="check a config file as serve would at start and print the effective settings",
        description="Validate FILE, open the model and match model.targets against it, load a text model's "
                    "tokenizer, read OTA's files; "
                    "print the effective settings (JSON, or YAML with --print). Exit 2 naming the key if "
                    "serve would refuse to start.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--state-dir", type=Path, metavar="DIR", help="as for serve")
    check.add_argument("--print", dest="print_yaml", action="store_true",
                       help="print the effective configuration as YAML (a valid config file itself)")
    sub.add_parser("config-schema", help="print the JSON Schema of the config file",
                   description="Print the JSON Schema (draft 2020-12) of the config file, for editors and CI.")

    inspect = sub.add_parser("inspect-model", help="list the MatMul/Gemm weights LoRA can target and their module paths")
    inspect.add_argument("model", type=Path, metavar="MODEL.onnx")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    imp = sub.add_parser(
        "import-model", help="build a LoRA-ready ONNX model from a Hugging Face checkpoint or a GGUF file (no torch needed)",
        description="bert: write SRC_DIR (config.json, model.safetensors, tokenizer.json) as an ONNX encoder with mean "
                    "pooling and normalised sentence embeddings. gguf: write a LLaMA-architecture SRC.gguf (llama.cpp's "
                    "format; Q4_0/Q4_1 linears, Q8_0 embedding) as an ONNX decoder with a KV cache, 4-bit linears as "
                    "MatMulNBits and the tokenizer inside (needs lorad[llm]). Weights keep their Hugging Face module names.")
    imp.add_argument("family", choices=["bert", "gguf"], help="architecture family of the checkpoint")
    imp.add_argument("src", type=Path, metavar="SRC", help="Hugging Face model directory (bert) or .gguf file (gguf)")
    imp.add_argument("out", type=Path, metavar="OUT.onnx")
    quant = sub.add_parser(
        "quantize-model", help="write the base model with int8 or int4 weights (ONNX Runtime's quantiser; LoRA stays float)",
        description="Quantise IN's MatMul/Gemm weights to 8 or 4 bits per weight (com.microsoft.MatMulNBits, a scale "
                    "and zero point per block of input features) and, for int4, its embedding tables "
                    "(GatherBlockQuantized), with onnxruntime.quantization's MatMulNBits quantiser (needs "
                    "lorad[quantize]). Module paths, the tokenizer and labels are kept, so PEFT adapters load as on "
                    "the fp32 model; LoRA paths are added in float when the model is served or trained. Adapters "
                    "lorad made for the fp32 model are bound to it: train again on the quantised base.")
    quant.add_argument("src", type=Path, metavar="IN.onnx")
    quant.add_argument("out", type=Path, metavar="OUT.onnx")
    # adapters/quantize.py's WEIGHT_TYPES and BLOCK_SIZES (not imported here: it pulls in onnx,
    # 0.7 s on every command; tests/unit/test_quantize.py keeps the lists equal).
    quant.add_argument("--weights", required=True, choices=["int8", "int4"], help="bits per base weight")
    quant.add_argument("--block", type=int, choices=[32, 64, 128],
                       help="input features per scale and zero point (default 128 for int8: faster, "
                            "32 for int4: more accurate)")
    quant.add_argument("--keep-embeddings", action="store_true",
                       help="leave embedding tables in fp32 (int4 quantises them by default)")
    inst = sub.add_parser(
        "install-service", help="install the systemd unit, service user, directories and default config",
        description="Install lorad as a systemd service (Raspberry Pi OS, JetPack, Debian): the unit in "
                    "/etc/systemd/system, the user (systemd-sysusers), /etc/lorad/lorad.yaml (kept if present) "
                    "and /var/lib/lorad. Prints every step.")
    inst.add_argument("--user", default="lorad", metavar="NAME", help="service user and group (default lorad)")
    inst.add_argument("--prefix", type=Path, metavar="DIR",
                      help="where lorad is installed: ExecStart is DIR/bin/lorad (default: this installation's prefix)")
    inst.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                      help="install into this root directory instead of / (an image, a test)")
    inst.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the versions are looked up when asked for, not at every start (the
    onnxruntime distribution's version scans the installed packages)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show the versions of lorad and onnxruntime and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"lorad {lorad_version()} (onnxruntime {ort_version()})")  # on stdout, as argparse's own
        parser.exit()


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file named by ``args`` with the command-line flags applied on top."""
    path = getattr(args, "config", None) or getattr(args, "file", None)
    overrides: dict[str, object] = {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.unix_socket": _str_or_none(getattr(args, "unix_socket", None)),
        "state_dir": _str_or_none(getattr(args, "state_dir", None)),
        "log_level": getattr(args, "log_level", None),
    }
    return load_config(path, overrides=overrides)


def _str_or_none(p: Path | None) -> str | None:
    return str(p.absolute()) if p is not None else None


def effective_config(config: Config) -> dict[str, object]:
    """The validated settings as plain data (paths as strings, sizes in bytes)."""
    doc: dict[str, object] = config.model_dump(mode="json")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    return console_main(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect-model":
        return _inspect_model(args.model, as_json=args.json)
    if args.command == "import-model":
        return _import_model(args.family, args.src, args.out)
    if args.command == "quantize-model":
        return _quantize_model(args.src, args.out, weights=args.weights, block=args.block,
                               embeddings=not args.keep_embeddings)
    if args.command == "install-service":
        from lorad.daemon.install_service import InstallPlan, default_prefix, install_service

        prefix = args.prefix.absolute() if args.prefix is not None else default_prefix()
        try:
            return install_service(InstallPlan(user=args.user, prefix=prefix, root=args.root.absolute(),
                                               dry_run=args.dry_run))
        except ValueError as e:
            print(f"lorad: {e}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:
            print(f"lorad: install-service failed: {e}", file=sys.stderr)
            return EXIT_RUNTIME
    if args.command == "config-schema":
        print(json.dumps(config_schema(), indent=2))
        return EXIT_OK
    try:
        config = config_from_args(args)
        if args.command == "check-config":
            from lorad.daemon.preflight import StartupError, check_startable  # ORT: only to check or serve

            try:
                check_startable(config)
            except StartupError as e:
                raise ConfigError(e.key, e.detail) from e
    except ConfigError as e:
        print(f"lorad: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        import yaml

        doc = effective_config(config)
        print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip("\n") if args.print_yaml
              else json.dumps(doc, indent=2))
        return EXIT_OK

    logging_to = setup_logging(config.log_level)
    from lorad.daemon.app import run  # the runtime (ORT, aiohttp) is only needed to serve

    try:
        asyncio.run(run(config, reload_config=lambda: config_from_args(args)))
    except ConfigError as e:  # a setting this machine cannot honour, found while starting (power.source)
        _log.error("invalid configuration: %s", e)
        if logging_to != "stderr":
            print(f"lorad: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (AuthError, AdapterError, TrainerError, OSError, RuntimeError) as e:
        _log.error("cannot serve: %s", e)
        if logging_to != "stderr":
            print(f"lorad: cannot serve: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _inspect_model(path: Path, *, as_json: bool) -> int:
    from lorad.daemon.inspect_model import inspect_model, render, to_json

    try:
        report = inspect_model(path)
    except ValueError as e:
        return fail("lorad", EXIT_USAGE, f"inspect-model: {e}", as_json=as_json)
    print(to_json(report) if as_json else render(report))
    return EXIT_OK


def _import_model(family: str, src: Path, out: Path) -> int:
    from lorad.adapters.fsutil import atomic_write_bytes
    from lorad.adapters.module_paths import ModulePaths

    try:
        if family == "gguf":
            from lorad.adapters.gguf_import import import_gguf

            model = import_gguf(src)
        else:
            from lorad.adapters.bert_builder import import_bert_dir

            model = import_bert_dir(src)
        atomic_write_bytes(out, model.SerializeToString())
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an optional extra is not installed
        print(f"lorad: import-model: {e}", file=sys.stderr)
        return EXIT_USAGE
    weights = sum(1 for w in ModulePaths.from_model(model).weights if w.module is not None)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {weights} LoRA-able linear weights named by module path)")
    return EXIT_OK


def _quantize_model(src: Path, out: Path, *, weights: str, block: int | None, embeddings: bool) -> int:
    import onnx

    from lorad.adapters.fsutil import atomic_write_bytes
    from lorad.adapters.quantize import describe, quantization_of, quantize_model

    try:
        model = onnx.load(str(src))
    except FileNotFoundError:
        print(f"lorad: quantize-model: {src}: no such file", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # protobuf raises its own untyped errors for a file that is not ONNX
        print(f"lorad: quantize-model: {src} is not an ONNX model: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        quantised = quantize_model(model, weights, block=block, embeddings=embeddings)
        atomic_write_bytes(out, quantised.SerializeToString())
    except (ValueError, OSError) as e:
        print(f"lorad: quantize-model: {e}", file=sys.stderr)
        return EXIT_USAGE
    totals = describe(quantization_of(quantised))
    parts = ", ".join(f"{t['weights']} {dtype} ({_size(t['bytes'])})" for dtype, t in sorted(totals.items()))
    print(f"wrote {out}: {_size(src.stat().st_size)} -> {_size(out.stat().st_size)}; weights: {parts}")
    return EXIT_OK


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    sys.exit(main())
