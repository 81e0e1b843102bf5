"""Utility benchmark: what private training with lorad's defaults is worth, and an audit.

For the demo tasks ``plus-one`` and ``mirror`` (:mod:`benchmarks.dp_tasks`: the embedded
demo model as the frozen base, 400 training examples of the bundled digits, accuracy on
359 test images through the serving engine), trained on the default (portable) backend
exactly as a daemon run trains, so it runs on a plain ``onnxruntime`` install; mean of 3
seeds, same data and steps:

- ``base``: the base model without an adapter;
- ``nonprivate``: training without clipping or noise, the best of the configuration under
  test and lorad's defaults, each at its learning rate, a third and a tenth of it (a tuned
  non-private bar that a variant cannot lower);
- ``eps1``, ``eps3``, ``eps8``: the configuration under test (lorad's defaults,
  trainer/config.py, chosen by benchmarks/sweep_defaults.py; ``--config`` changes keys of
  it) with the run's total accounted ε (its DP-SGD steps, the private example count and
  the private gate decision, composed by the configuration's accountant at δ = 1e-5)
  equal to 1, 3, 8 — i.e. ``target_epsilon: ε`` with ``budget_fraction: 1``;
- ``gap_eps8``: ``nonprivate`` − ``eps8`` (the goal: at most 0.05);
- ``audit_eps_estimate_eps8`` (and ``audit_eps_estimate_lower_eps8``, its 95 % lower
  confidence bound, the verdict's figure): the one-run canary audit's ε estimate
  (trainer/audit.py) of the ε = 8 configuration; ``audit_eps_lower_bound_eps8`` its rigorous
  lower bound; next to ``audit_eps_accounted_eps8`` (the DP-SGD steps' ε it audits) and
  ``audit_consistent_eps8``.

The MiniLM intents task (examples/intents) is not here: one DP run of it takes about 85 s
on 2 cores (benchmarks/personalisation.py measures it through a real daemon), and this
benchmark's 18 runs per task would take about half an hour.

    .venv/bin/python -m benchmarks.utility [--seeds 3] [--quick] [--config '{"batch_size": 400, ...}']

Last line: {"tasks": {"plus-one": {"base", "nonprivate", "eps1", "eps3", "eps8", "gap_eps8",
"audit_eps_estimate_eps8", ...}, "mirror": {...}}, "seeds", "config", "wall_s", "loadavg"}
(``config``: the ``--config`` keys; ``loadavg``: the 1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dp_tasks import Task, base_accuracy, tasks, train_and_score
from lorad.trainer.config import AdapterTrainingConfig

_EPSILONS = (1.0, 3.0, 8.0)


def replace(config: AdapterTrainingConfig, **changes: Any) -> AdapterTrainingConfig:
    """A validated copy of ``config`` with ``changes`` (pydantic's model_copy would not validate)."""
    return AdapterTrainingConfig(**{**config.model_dump(), **changes})


def _mean(task: Task, config: AdapterTrainingConfig, seeds: range, *, private: bool = True) -> float:
    return float(np.mean([train_and_score(task, config, seed=s, private=private)["accuracy"] for s in seeds]))


def _audit(task: Task, config: AdapterTrainingConfig, canaries: int) -> dict[str, Any]:
    """The audit on the task's examples in a throw-away trainer environment."""
    from lorad.adapters.engine import InferenceEngine
    from lorad.adapters.registry import AdapterRegistry
    from lorad.adapters.service import AdapterService
    from lorad.trainer.audit import audit_adapter
    from lorad.trainer.example_store import ExampleStore
    from lorad.trainer.ledger import PrivacyLedger
    from lorad.trainer.noise import SecureNoise
    from lorad.trainer.run import TrainerEnv

    root = Path(tempfile.mkdtemp(prefix="lorad-utility-audit-"))
    service = AdapterService(InferenceEngine(task.model, targets=task.targets, rank=task.rank),
                             AdapterRegistry(root / "adapters"), cache_budget_bytes=1 << 24)
    store = ExampleStore(root / "examples.sqlite3", max_examples_per_adapter=100_000, max_bytes=1 << 28,
                         retention_days=30)
    ledger = PrivacyLedger(root / "ledger.json")
    try:
        name = service.engine.inputs[0].name
        for x, y in zip(task.x_train, task.y_train, strict=True):
            store.add("audit", {name: x}, np.asarray(int(y), np.int64))
        # Every example is training data here (the gate is not audited).
        env = TrainerEnv(service=service, store=store, ledger=ledger, state_dir=root, noise=SecureNoise(),
                         rng=np.random.default_rng)
        result = audit_adapter(env, "audit", replace(config, holdout_fraction=1e-9), canaries=canaries)
        return result.to_dict()
    finally:
        ledger.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="one seed, 256 canaries")
    p.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                   help="keys of the trainer's adapter settings (AdapterTrainingConfig) over lorad's defaults, "
                        "e.g. '{\"accountant\": \"pld\", \"batch_size\": 400, \"epochs\": null, \"steps\": 188}'")
    args = p.parse_args(argv)
    seeds = range(1 if args.quick else args.seeds)
    canaries = 256 if args.quick else args.canaries
    # The configuration under test: lorad's defaults with --config's keys.
    defaults = replace(AdapterTrainingConfig(), **args.config)
    bars = [defaults] if not args.config else [defaults, AdapterTrainingConfig()]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    out: dict[str, Any] = {}
    for task in tasks():
        row: dict[str, Any] = {"base": base_accuracy(task)}
        row["nonprivate"] = max(_mean(task, replace(bar, learning_rate=lr), seeds, private=False)
                                for bar in bars
                                for lr in (bar.learning_rate, bar.learning_rate / 3, bar.learning_rate / 10))
        for eps in _EPSILONS:
            config = replace(defaults, target_epsilon=eps, budget_fraction=1.0)
            row[f"eps{eps:g}"] = _mean(task, config, seeds)
        row["gap_eps8"] = row["nonprivate"] - row["eps8"]
        audit = _audit(task, replace(defaults, target_epsilon=8.0, budget_fraction=1.0), canaries)
        row["audit_eps_estimate_eps8"] = audit["epsilon_estimate"]
        row["audit_eps_estimate_lower_eps8"] = audit["epsilon_estimate_lower"]
        row["audit_eps_lower_bound_eps8"] = audit["epsilon_lower_bound"]
        row["audit_eps_accounted_eps8"] = audit["epsilon_accounted"]
        row["audit_consistent_eps8"] = audit["consistent"]
        row["audit_guesses"] = (f"{audit['correct']}/{audit['guesses']} of {audit['canaries']} canaries, "
                                f"{audit['inserted']} inserted")
        plan = defaults.plan(len(task.y_train))
        row["steps"], row["q"], row["train_examples"] = plan.steps, plan.q, len(task.y_train)
        out[task.name] = row
        print(f"{task.name}: {row}", file=sys.stderr, flush=True)
    wall = time.monotonic() - started
    print(f"{wall:.0f} s (shared machine: timings noisy, accuracies are not)", file=sys.stderr)
    print(json.dumps({"tasks": out, "seeds": len(seeds), "config": args.config, "wall_s": round(wall, 1),
                      "loadavg": [load_before, os.getloadavg()[0]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
