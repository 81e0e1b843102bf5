"""The federated benchmark's smaller run with every part real (benchmarks/federated.py).

A real ``flower-superlink --insecure`` (benchmarks/flower.py's harness), one real
``lorad serve`` per user on the intents model with a ``federated:`` section (so each daemon
runs its own Flower SuperNode, and each round is a local DP run of its ``fleet`` adapter
through ``/v2/federated``), the user's training texts added over HTTP as ``loractl
examples add`` does, then ``loractl fleet federate REPO --no-push`` (``flwr run`` of lorad's
Flower App: SecAgg+, central DP) with the simulation's dp_eps8 settings. Each round's
adapter is signed into a fresh fleet repository (not pushed: there is no broker here) and
scored on the users' held-out sets; ``round_s`` is the ServerApp's (federation.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.federated_data import UserData
from benchmarks.personalisation import Daemon

__all__ = ["run_superlink"]

ADAPTER = "fleet"


def _config(path: Path, *, model: Path, args: argparse.Namespace, trainer: dict[str, Any],
            federated: dict[str, Any]) -> Path:
    config = {
        "model": {"name": "intents", "path": str(model), "targets": list(args.targets), "rank": args.rank,
                  "max_text_tokens": args.max_text_tokens},
        "cache": {"budget_bytes": "64MiB"},
        "trainer": trainer,
        "federated": federated,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _loractl() -> list[str]:
    exe = Path(sys.executable).parent / "loractl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.ctl"]


def run_superlink(args: argparse.Namespace, *, model: Path, users: Sequence[UserData], trainer: dict[str, Any],
                  round_epsilon: float, central_epsilon: float, work: Path,
                  score: Callable[[Sequence[UserData], list[Any]], dict[str, float]]) -> dict[str, Any]:
    """The real run; ``score(users, adapters)`` scores one adapter per user."""
    from benchmarks.flower import SuperLink
    from lorad.adapters.peft_format import load_peft, read_peft_dir
    from lorad.ota.cli import main as fleet_main

    work.mkdir(parents=True)
    daemons: list[Daemon] = []
    began = time.monotonic()
    with SuperLink(work / "superlink", tls=None) as link:
        try:
            configs = []
            for i, user in enumerate(users):
                configs.append(_config(work / f"user-{i}.yaml", model=model, args=args, trainer=trainer,
                                       federated=link.federated_section(adapter=ADAPTER, round_epsilon=round_epsilon,
                                                                        min_examples=20, max_round_s=1800.0)))
                daemon = Daemon(configs[-1], work / f"user-{i}")
                daemons.append(daemon)
                for row in user.train:
                    daemon.call("POST", f"/v2/models/{daemon.model}/adapters/{ADAPTER}/examples",
                                {"text": row["text"], "label": row["label"]})
            link.wait_nodes(len(users), timeout_s=300)
            ready_s = time.monotonic() - began
            repo, out = work / "repo", work / "rounds"
            with contextlib.redirect_stdout(sys.stderr):
                if fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) != 0:
                    raise RuntimeError("loractl fleet init failed")
            command = [*_loractl(), "--json", "fleet", "federate", str(repo), "--name", ADAPTER, "--all", "--no-push",
                       "--config", str(configs[0]), "--superlink", link.address, "--insecure-superlink",
                       "--out", str(out), "--rounds", str(args.superlink_rounds), "--min-clients", str(len(users)),
                       "--central-epsilon", str(central_epsilon), "--central-delta", str(args.central_delta),
                       "--clip-norm", str(args.clip_norm), "--round-timeout-s", "1800"]
            federate_began = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, check=False)
            federate_s = time.monotonic() - federate_began
            if done.returncode != 0:
                raise RuntimeError(f"loractl fleet federate exited with {done.returncode}:\n{done.stderr[-6000:]}\n"
                                   f"SuperLink log:\n{link.logs()[-4000:]}")
            published = json.loads(done.stdout)["rounds"]
        finally:
            for daemon in daemons:
                daemon.stop()
    summaries = [json.loads((d / "federation.json").read_text()) for d in sorted(out.glob("round-*")) if d.is_dir()]
    rounds: dict[str, Any] = {}
    for summary in summaries:
        k = int(summary["round"])
        adapter = load_peft(read_peft_dir(out / f"round-{k:04d}"))
        rounds[str(k)] = {**score(users, [adapter] * len(users)), "round_s": round(summary["round_s"], 2),
                          "clients": summary["clients"], "central_epsilon": summary["central_epsilon"],
                          "local_epsilon": sorted(summary["local_epsilon"].values())}
    return {"users": [u.name for u in users], "rounds": rounds,
            "round_s": [round(s["round_s"], 2) for s in summaries],
            "round_s_mean": round(sum(s["round_s"] for s in summaries) / max(1, len(summaries)), 2),
            "published_versions": [r["version"] for r in published],
            "federate_wall_s": round(federate_s, 1), "daemons_ready_s": round(ready_s, 1),
            "central_epsilon": central_epsilon, "round_epsilon": round_epsilon}
