"""Signed metadata at fleet scale: ``targets.json`` bytes for a large fleet after many rollouts.

A simulation of the fleet's repository, no broker and no device: ``rollouts`` staged rollouts
over a fleet of ``devices`` devices, signed by lorad's own :class:`FleetRepository` exactly as
``loractl fleet rollout create``/``run`` sign them (:func:`lorad.ota.rollout_cli.start_rollout`,
:func:`lorad.ota.rollout.decide`, :func:`lorad.ota.rollout_cli.apply_to_repository`). Each
rollout sends the next version of one of ``adapters`` adapters (rank 8 on eight 256-wide
weights, zstd: about 16 chunk digests per target) through a canary of five named devices,
then an exponential ramp (``1%x4``: 1, 4, 16, 64, 100 %); every tenth rollout halts at its
second stage (30 % of the new devices fail) and its target is withdrawn. Every device
reports healthy at once, so each stage advances on its next decision.

- ``targets_json_bytes``: size of the signed ``targets.json`` after the last rollout;
  ``targets_json_max_bytes``: the largest it was after any of the ``signatures`` (every stage
  of every rollout; the claim: at most ``claim_bytes``, 100 KB, against python-tuf's
  5,000,000-byte client limit);
- ``targets``: targets it lists at the end; ``targets_json_bytes_by_rollout``: its size after
  each rollout;
- ``explicit_list_bytes``: what one audience of the whole fleet takes when it lists every
  device by name (how stages were signed before: it stayed after each rollout).

    .venv/bin/python -m benchmarks.fleet_metadata [--devices 100000] [--rollouts 100]

:func:`simulate` is what ``benchmarks/fleet_scale.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.ota.audience import Audience
from lorad.ota.repository import CLIENT_MAX_BYTES, FleetRepository
from lorad.ota.rollout import DeviceObs, RolloutPlan, RolloutState, acted, decide, parse_stages, select
from lorad.ota.rollout_cli import apply_to_repository, start_rollout

__all__ = ["CLAIM_BYTES", "simulate"]

#: What ``targets.json`` may reach for 100,000 devices after 100 rollouts.
CLAIM_BYTES = 100_000
_FINGERPRINT = "sha256:" + "5" * 64
_GROUPS = 50


def _adapter(seed: int) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(rank=8, alpha=16.0, base_fingerprint=_FINGERPRINT, weights={
        f"layers.{i}.q_proj.weight": LoraWeights(A=rng.standard_normal((256, 8)).astype(np.float32),
                                                B=rng.standard_normal((8, 256)).astype(np.float32))
        for i in range(8)})


def _targets_bytes(repo: FleetRepository) -> int:
    return (repo.dir / "metadata" / "targets.json").stat().st_size


def _drive(repo: FleetRepository, plan: RolloutPlan, *, halt_at: int | None, seen: list[int]) -> RolloutState:
    """Decide and act until the rollout is done or halted (and withdrawn); devices of a
    stage report at once: healthy, or failed (30 % of the new ones) at stage ``halt_at``.
    ``seen`` gets the size of ``targets.json`` after every change."""
    now = 0.0
    state, decisions = decide(plan, RolloutState(), {}, now)
    obs: dict[str, DeviceObs] = {}
    while True:
        for d in decisions:
            apply_to_repository(repo, plan, d)
            seen.append(_targets_bytes(repo))
        state = acted(state)
        if state.status in ("done", "aborted") and not decisions:
            return state
        targeted = select(plan, state.stage)
        new = [d for d in targeted if d not in obs]
        failing = set(new[:len(new) * 3 // 10]) if state.stage == halt_at else set()
        obs.update({d: DeviceObs("failed", reason="health_check_failed") if d in failing else DeviceObs("healthy", 1)
                    for d in new})
        now += 1.0
        state, decisions = decide(plan, state, obs, now)


def simulate(devices: int = 100_000, rollouts: int = 100, *, adapters: int = 4,
             directory: Path | None = None) -> dict[str, Any]:
    """Sign ``rollouts`` rollouts over ``devices`` devices in a fresh repository (in
    ``directory``, or a temporary one) and measure ``targets.json``."""
    if devices < 10 or rollouts < 1 or adapters < 1:
        raise ValueError("devices >= 10, rollouts >= 1, adapters >= 1")
    with tempfile.TemporaryDirectory(prefix="lorad-fleet-metadata-") as tmp:
        repo = FleetRepository.init((directory or Path(tmp)) / "fleet")
        population = {f"dev{i:06d}": (f"site-{i % _GROUPS:02d}",) for i in range(devices)}
        canaries = "+".join(sorted(population)[:5])
        stages = parse_stages(f"devices:{canaries},1%x4")
        sizes: list[int] = []  # after each rollout
        seen: list[int] = []  # after each signature, mid-rollout too
        halted = 0
        t0 = time.perf_counter()
        for r in range(rollouts):
            name = f"a{r % adapters}"
            plan = RolloutPlan(name=f"r{r:03d}", adapter=name, version=repo.latest_version(name) + 1,
                               stages=stages, population=population, success_threshold=0.95,
                               abort_threshold=0.2, label=f"r-r{r:03d}")
            plan, _ = start_rollout(repo, plan, _adapter(r), chunk_size=8 * 1024)
            seen.append(_targets_bytes(repo))
            state = _drive(repo, plan, halt_at=1 if r % 10 == 9 else None, seen=seen)
            halted += state.status == "aborted"
            sizes.append(_targets_bytes(repo))
        took = time.perf_counter() - t0
        listed = len(json.dumps(Audience(devices=tuple(population)).to_dict(), separators=(",", ":")))
        return {"benchmark": "fleet_metadata", "devices": devices, "rollouts": rollouts, "adapters": adapters,
                "stages": f"devices:<5 canaries>,1%x4 ({len(stages)} stages)", "halted": halted,
                "targets_json_bytes": sizes[-1], "targets_json_max_bytes": max(seen), "signatures": len(seen),
                "targets": len(repo.targets()), "targets_json_bytes_by_rollout": sizes, "claim_bytes": CLAIM_BYTES,
                "client_limit_bytes": CLIENT_MAX_BYTES["targets"], "explicit_list_bytes": listed,
                "within_claim": max(seen) <= CLAIM_BYTES, "seconds": round(took, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--rollouts", type=int, default=100)
    parser.add_argument("--adapters", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(simulate(args.devices, args.rollouts, adapters=args.adapters)))


if __name__ == "__main__":
    main()
