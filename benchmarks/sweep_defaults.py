"""Sweep the DP-SGD settings a first `loractl train` uses, to choose lorad's defaults.

On the demo tasks ``plus-one`` and ``mirror`` (:mod:`benchmarks.dp_tasks`: the embedded
demo model, 400 training examples of the bundled digits, accuracy on the 359 test
images), every combination of optimiser and learning rate, clipping norm C, expected
batch size (q = B/n) and epochs (steps = epochs/q) is trained once per seed at the
default budget (ε = 8 with budget_fraction 0.5: the first run spends about 4, count and
gate queries included). The score of a setting is its mean accuracy over both tasks and
the seeds. Stage 2 re-runs the best settings with more seeds together with their
neighbours past the grid's edges (twice the epochs, half and twice the learning rate,
twice the batch), and the winner is printed.

    .venv/bin/python -m benchmarks.sweep_defaults [--quick] [--seeds 1] [--final-seeds 3] [--stage1 OUT]

The defaults in trainer/config.py (AdapterTrainingConfig) come from this sweep; the
README quotes its result. Last line: one JSON object {"best": {...}, "top": [...]}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

import numpy as np

from benchmarks.dp_tasks import tasks, train_and_score
from lorad.trainer.config import AdapterTrainingConfig

_LEARNING_RATES = {"adamw": (0.003, 0.01, 0.03, 0.1), "sgd": (0.1, 0.3, 1.0, 3.0)}
_CLIP_NORMS = (0.1, 1.0)
_BATCH_SIZES = (32.0, 64.0, 128.0)
_EPOCHS = (5.0, 15.0)
_KEYS = ("optimizer", "learning_rate", "clip_norm", "batch_size", "epochs")


def _refinements(setting: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 2: a setting's neighbours beyond the grid's edges (twice the epochs, half
    and twice the learning rate, twice the batch)."""
    return [{**setting, "epochs": setting["epochs"] * 2},
            {**setting, "learning_rate": setting["learning_rate"] * 2},
            {**setting, "learning_rate": setting["learning_rate"] / 2},
            {**setting, "batch_size": setting["batch_size"] * 2, "epochs": setting["epochs"] * 2}]


def _grid(quick: bool) -> list[dict[str, Any]]:
    out = []
    for optimizer, lrs in _LEARNING_RATES.items():
        for lr, c, b, e in itertools.product(lrs, _CLIP_NORMS, _BATCH_SIZES, _EPOCHS):
            out.append({"optimizer": optimizer, "learning_rate": lr, "clip_norm": c, "batch_size": b, "epochs": e})
    return out[::7] if quick else out


def _score(setting: dict[str, Any], seeds: range, task_list: list[Any]) -> dict[str, Any]:
    config = AdapterTrainingConfig(**setting)
    per_task = {t.name: float(np.mean([train_and_score(t, config, seed=s)["accuracy"] for s in seeds]))
                for t in task_list}
    return {**setting, "accuracy": per_task, "mean": float(np.mean(list(per_task.values())))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every 7th setting only")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--final-seeds", type=int, default=3)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--stage1", type=argparse.FileType(), metavar="JSON",
                   help="reuse stage 1: the last line of an earlier run of this script")
    args = p.parse_args(argv)
    task_list = tasks()
    started = time.monotonic()

    def show(r: dict[str, Any]) -> None:
        print(f"{r['optimizer']:5} lr {r['learning_rate']:<6g} C {r['clip_norm']:<4g} B {r['batch_size']:<5g} "
              f"epochs {r['epochs']:<4g} -> {r['mean']:.3f} {r['accuracy']}", file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    if args.stage1 is not None:
        results = json.loads(args.stage1.readlines()[-1])["top"]
    else:
        for setting in _grid(args.quick):
            results.append(_score(setting, range(args.seeds), task_list))
            show(results[-1])
    results.sort(key=lambda r: -r["mean"])
    # Stage 2: the best settings and their neighbours past the grid's edges, more seeds.
    candidates: list[dict[str, Any]] = []
    for r in results[: args.top]:
        for setting in [{k: r[k] for k in _KEYS}, *_refinements({k: r[k] for k in _KEYS})]:
            if setting not in candidates:
                candidates.append(setting)
    final = []
    for setting in candidates:
        final.append(_score(setting, range(100, 100 + args.final_seeds), task_list))
        show(final[-1])
    final.sort(key=lambda r: -r["mean"])
    print(f"{len(results)} settings in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps({"best": final[0], "top": final, "settings": len(results), "train_examples": len(task_list[0].y_train)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
