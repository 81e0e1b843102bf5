"""Utility benchmark: what private training with lorad's defaults is worth, and an audit.

For the demo tasks ``plus-one`` and ``mirror`` (:mod:`benchmarks.dp_tasks`: the embedded
demo model as the frozen base, 400 training examples of the bundled digits, accuracy on
359 test images through the serving engine), mean of 3 seeds, same data and steps:

- ``base``: the base model without an adapter;
- ``nonprivate``: the default configuration without clipping or noise (the best of the
  default learning rate, a third and a tenth of it: a tuned non-private bar);
- ``eps1``, ``eps3``, ``eps8``: the defaults (trainer/config.py, chosen by
  benchmarks/sweep_defaults.py) with the run's total accounted ε (its DP-SGD steps, the
  private example count and the private gate decision, composed by the RDP accountant
  at δ = 1e-5) equal to 1, 3, 8 — i.e. ``target_epsilon: ε`` with ``budget_fraction: 1``;
- ``audit_eps_lower_bound_eps8``: the one-run canary audit (trainer/audit.py) of the ε = 8
  configuration, next to ``audit_eps_accounted_eps8`` (the DP-SGD steps' ε it audits).

The MiniLM intents task of issue 8 joins through :func:`benchmarks.dp_tasks.tasks` once
its model and data are in the tree.

    .venv/bin/python -m benchmarks.utility [--seeds 3] [--quick]

Last line: {"tasks": {"plus-one": {"base", "nonprivate", "eps1", "eps3", "eps8",
"audit_eps_lower_bound_eps8", ...}, "mirror": {...}}}.
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args(argv)
    seeds = range(1 if args.quick else args.seeds)
    canaries = 256 if args.quick else args.canaries
    defaults = AdapterTrainingConfig()
    started = time.monotonic()
    out: dict[str, Any] = {}
    for task in tasks():
        row: dict[str, Any] = {"base": base_accuracy(task)}
        row["nonprivate"] = max(_mean(task, replace(defaults, learning_rate=lr), seeds, private=False)
                                for lr in (defaults.learning_rate, defaults.learning_rate / 3,
                                           defaults.learning_rate / 10))
        for eps in _EPSILONS:
            config = replace(defaults, target_epsilon=eps, budget_fraction=1.0)
            row[f"eps{eps:g}"] = _mean(task, config, seeds)
        audit = _audit(task, replace(defaults, target_epsilon=8.0, budget_fraction=1.0), canaries)
        row["audit_eps_lower_bound_eps8"] = audit["epsilon_lower_bound"]
        row["audit_eps_accounted_eps8"] = audit["epsilon_accounted"]
        row["audit_guesses"] = f"{audit['correct']}/{audit['guesses']} of {audit['canaries']} canaries"
        plan = defaults.plan(len(task.y_train))
        row["steps"], row["q"], row["train_examples"] = plan.steps, plan.q, len(task.y_train)
        out[task.name] = row
        print(f"{task.name}: {row}", file=sys.stderr, flush=True)
    print(f"{time.monotonic() - started:.0f} s (shared machine: timings noisy, accuracies are not)", file=sys.stderr)
    print(json.dumps({"tasks": out, "seeds": len(seeds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
