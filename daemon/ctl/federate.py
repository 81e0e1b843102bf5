"""``loractl fleet federate``: federated rounds on the fleet's Flower SuperLink, each round's
adapter signed and published through the OTA path.

It submits lorad's Flower App (daemon/federated/flower_app: the ServerApp and ClientApp are
lorad's modules) with ``flwr run``, its run config made from the options, and streams
Flower's log to stderr. The ServerApp (daemon/federated/server_app.py) writes each round's
aggregate adapter and privacy record to ``--out DIR/round-<k>/``; as each appears, this
command publishes it exactly as ``loractl fleet publish --adapter DIR/round-<k>`` would
(signed, to the audience given, with its privacy record, health probes from ``--config``),
so devices install it through the verified OTA path, and staged rollouts can take it from
there. The SuperLink runs on this machine (the ServerApp writes into ``--out``)::

    loractl fleet federate REPO --key-dir KEYS --broker HOST:PORT --ca ... --cert ... --key ... \\
        --superlink 127.0.0.1:9092 --root-certificates flower-ca.pem --out rounds/ \\
        --name fleet --config lorad.yaml --all --rounds 5 --central-epsilon 8 --clip-norm 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["register_federate"]

#: The run config keys ``flwr run`` gets, from the options of the same name.
_RUN_CONFIG = {"rounds": int, "min_clients": int, "fraction": float, "fleet_size": int, "central_epsilon": float,
               "central_delta": float, "clip_norm": float, "secagg_shares": float, "secagg_threshold": float,
               "round_timeout_s": float}


def register_federate(leaf: Callable[..., argparse.ArgumentParser]) -> None:
    from lorad.ota.cli import add_publish_args

    p = leaf("federate", _federate, "run federated DP-LoRA rounds on the fleet's Flower SuperLink and publish "
             "each round's adapter", broker=True)
    add_publish_args(p, adapter_dir=False)
    g = p.add_argument_group("federation (Flower)")
    g.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    tls = g.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, metavar="CA_PEM", help="CA that signed the SuperLink's certificate")
    tls.add_argument("--insecure-superlink", action="store_true", help="plain HTTP to the SuperLink (labs only)")
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="where each round's adapter is written")
    g.add_argument("--device-adapter", help="the devices' federated adapter (federated.adapter; default --name)")
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--min-clients", type=int, default=2, help="fewest devices a round aggregates (at least 2)")
    g.add_argument("--fraction", type=float, default=1.0, help="share of the eligible devices sampled per round")
    g.add_argument("--fleet-size", type=int, default=0,
                   help="devices that could be sampled (the central accountant's q = clients / fleet size; "
                        "0: a round's clients are the whole fleet, q = 1)")
    g.add_argument("--central-epsilon", type=float, default=8.0,
                   help="user-level ε of all the rounds together (0: no central noise, no guarantee)")
    g.add_argument("--central-delta", type=float, default=1e-5)
    g.add_argument("--clip-norm", type=float, default=1.0, help="each device's update is clipped to this L2 norm")
    g.add_argument("--secagg-shares", type=float, default=1.0,
                   help="SecAgg+ key shares per device (a fraction of the round's devices, or a count)")
    g.add_argument("--secagg-threshold", type=float, default=0.6,
                   help="SecAgg+ shares needed to recover a dropped device (fraction of the shares, or a count)")
    g.add_argument("--round-timeout-s", type=float, default=3600.0)


def _connection(args: argparse.Namespace, home: Path) -> None:
    """The ``flwr`` CLI's SuperLink connection, in its own FLWR_HOME."""
    lines = ['[superlink]', 'default = "lorad"', '', '[superlink.lorad]', f'address = {json.dumps(args.superlink)}']
    if args.insecure_superlink:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(args.root_certificates.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run_config(args: argparse.Namespace, base_fingerprint: str) -> dict[str, Any]:
    """The run config of the options, checked as the ServerApp will check it (ValueError
    naming the option): a bad setting fails here, not after the run was submitted."""
    from lorad.daemon.federated.server_app import FederationSettings

    values: dict[str, Any] = {name.replace("_", "-"): kind(getattr(args, name)) for name, kind in _RUN_CONFIG.items()}
    values.update({"adapter": args.device_adapter or args.name, "out-dir": str(args.out.resolve()),
                   "base-fingerprint": base_fingerprint})
    FederationSettings.from_run_config(values)
    return values


def _base_fingerprint(args: argparse.Namespace) -> str:
    """The fleet's base model fingerprint from --config / --base-model / --base-fingerprint, or
    "" (the devices' majority decides)."""
    from lorad.ota.cli_support import _engine, _model_section

    section = _model_section(args)
    if section is not None:
        return str(_engine(section).fingerprint)
    return str(args.base_fingerprint or "")


def _rounds(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("round-*") if p.is_dir())


def _federate(args: argparse.Namespace) -> dict[str, Any]:
    from lorad.ota.cli import publish_dir

    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists():
        found = shutil.which("flwr")
        if found is None:
            raise RuntimeError("the flwr command is not installed: pip install 'lorad[federated]'")
        flwr = Path(found)
    if args.out.exists() and _rounds(args.out):
        raise FileExistsError(f"--out {args.out} already holds rounds of another federation; give an empty directory")
    run_config = _run_config(args, _base_fingerprint(args))
    args.out.mkdir(parents=True, exist_ok=True)
    published: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lorad-federate-") as tmp:
        home, app = Path(tmp) / "flwr", Path(tmp) / "app"
        home.mkdir()
        app.mkdir()
        template = resources.files("lorad.daemon") / "federated" / "flower_app" / "pyproject.toml"
        (app / "pyproject.toml").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
        _connection(args, home)
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()),
                             encoding="utf-8")
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
        # Flower's log goes to stderr: stdout stays this command's answer (--json).
        proc = subprocess.Popen([str(flwr), "run", str(app), "lorad", "--run-config", str(overrides), "--stream"],
                                env=env, stdout=sys.stderr, stderr=sys.stderr)
        try:
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    code = None
                for directory in _rounds(args.out)[len(published):]:
                    summary = json.loads((directory / "federation.json").read_text(encoding="utf-8"))
                    result = publish_dir(args, directory)
                    published.append({"round": summary["round"], "directory": str(directory),
                                      "version": result["version"], "clients": summary["clients"],
                                      "central_epsilon": summary["central_epsilon"],
                                      "local_epsilon": summary["local_epsilon"], "pushed": result.get("pushed")})
                    print(f"loractl fleet federate: round {summary['round']} published as {args.name!r} version "
                          f"{result['version']} ({summary['clients']} devices, central ε "
                          f"{summary['central_epsilon']})", file=sys.stderr)
                if code is not None:
                    break
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if len(published) < args.rounds:
        raise RuntimeError(f"the federation ended after {len(published)} of {args.rounds} rounds (flwr run exit "
                           f"{proc.returncode}); the log above says why")
    return {"name": args.name, "rounds": published, "out": str(args.out)}
