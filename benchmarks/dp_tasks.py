"""The demo tasks as private-training benchmarks: shared by sweep_defaults.py and utility.py.

Each task is one of the demo adapters' tasks (:data:`lorad.daemon.demo.build.DEMO_TASKS`:
``plus-one``, ``mirror``) on scikit-learn's bundled digits, with the embedded demo
model as the frozen base. :func:`train_and_score` trains one adapter with lorad's own
pieces exactly as a run in the daemon does on the default backend — the portable
private step graph (``build_artifacts(..., backend="portable")``, trainer/artifacts.py), the
stepper :func:`lorad.trainer.backends.open_stepper` opens for it (so it runs on a plain
``onnxruntime`` install: nothing imports ``onnxruntime.training``), Poisson sampling, the plan of
:meth:`lorad.trainer.config.AdapterTrainingConfig.plan` (σ calibrated with the run's count and
gate queries charged, as the ledger would) — and returns the accuracy of the result on
the held-out test images, scored through the serving engine.

Hook for the real-model task (issue 8, MiniLM intents): add a :class:`Task` to
:func:`tasks` when its model and data exist in the tree; nothing else changes here.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lorad.adapters.engine import InferenceEngine
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.trainer.artifacts import ArtifactConfig, Backend, build_artifacts
from lorad.trainer.backends import open_stepper
from lorad.trainer.config import AdapterTrainingConfig
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.noise import SeededNoise

__all__ = ["Task", "tasks", "train_and_score", "base_accuracy", "TRAIN_EXAMPLES"]

#: "A few hundred examples": what a first `loractl train` has.
TRAIN_EXAMPLES = 400


@dataclass(frozen=True)
class Task:
    name: str
    model: onnx.ModelProto
    targets: tuple[str, ...]
    rank: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def tasks(names: tuple[str, ...] = ("plus-one", "mirror"), *, n_train: int = TRAIN_EXAMPLES) -> list[Task]:
    from lorad.daemon.demo.build import DEMO_TASKS, load_split

    split = load_split()
    model = onnx.load(demo_model_path())
    out = []
    for t in DEMO_TASKS:
        if t.name not in names:
            continue
        x_tr, y_tr = t.apply(split.x_train, split.y_train)
        x_te, y_te = t.apply(split.x_test, split.y_test)
        out.append(Task(t.name, model, DEMO_TARGETS, DEMO_RANK, x_tr[:n_train].astype(np.float32),
                        y_tr[:n_train].astype(np.int64), x_te.astype(np.float32), y_te.astype(np.int64)))
    return out


_ENGINES: dict[tuple[int, tuple[str, ...], int], InferenceEngine] = {}


def _engine(task: Task) -> InferenceEngine:
    key = (id(task.model), task.targets, task.rank)
    if key not in _ENGINES:
        _ENGINES[key] = InferenceEngine(task.model, targets=task.targets, rank=task.rank)
    return _ENGINES[key]


def _accuracy(task: Task, adapter: Any) -> float:
    engine = _engine(task)
    prepared = engine.prepare(adapter, name="bench", version=0) if adapter is not None else None
    logits = engine.run({engine.inputs[0].name: task.x_test}, prepared)[engine.outputs[0].name]
    return float(np.mean(logits.argmax(axis=1) == task.y_test))


def base_accuracy(task: Task) -> float:
    return _accuracy(task, None)


_ARTIFACTS: dict[tuple[Any, ...], Any] = {}


def train_and_score(
    task: Task, config: AdapterTrainingConfig, *, seed: int, private: bool = True,
    cache_dir: Path | None = None, steps: int | None = None, backend: Backend = "portable",
) -> dict[str, Any]:
    """Train one adapter on the task's training examples; returns accuracy and the plan.

    ``private=False`` trains with the same graph, data, steps and learning rate without
    clipping or noise (the non-private baseline). ``steps`` overrides the planned steps.
    ``backend``: the daemon's default (portable) unless asked; ``ort-training`` needs
    onnxruntime-training.
    """
    n = len(task.y_train)
    plan = config.plan(n)  # the daemon plans from a noisy n; the benchmark from n itself
    if steps is not None:
        plan = replace(plan, steps=steps)
    key = (id(task.model), task.targets, backend, config.rank, config.alpha, config.freeze_a, config.use_rslora,
           config.optimizer, config.weight_decay, config.init_seed, config.a_init)
    if key not in _ARTIFACTS:
        cache = cache_dir or Path(tempfile.mkdtemp(prefix="lorad-bench-artifacts-"))
        _ARTIFACTS[key] = build_artifacts(task.model, ArtifactConfig(
            targets=task.targets, rank=config.rank, alpha=config.alpha, freeze_a=config.freeze_a,
            use_rslora=config.use_rslora, private=True, loss="cross_entropy",
            optimizer=config.optimizer, weight_decay=config.weight_decay, init_seed=config.init_seed,
            a_init=config.a_init,
            output=_engine(task).outputs[0].name), cache_dir=cache, backend=backend)
    artifacts = _ARTIFACTS[key]
    dp = (DPSettings(noise_multiplier=plan.sigma, clip_norm=plan.clip_norm, expected_batch_size=plan.expected_batch_size)
          if private else DPSettings(noise_multiplier=0.0, clip_norm=math.inf, expected_batch_size=plan.expected_batch_size))
    stepper = open_stepper(artifacts, learning_rate=config.learning_rate, dp=dp, noise=SeededNoise(seed),
                           intra_op_threads=1)
    rng = np.random.default_rng(seed)
    name_x = artifacts.data_inputs[0]
    for _ in range(plan.steps):
        picked = np.flatnonzero(rng.random(n) < plan.q)
        stepper.step({name_x: task.x_train[picked], artifacts.label_input: task.y_train[picked]})
    acc = _accuracy(task, stepper.export_adapter())
    close = getattr(stepper, "close", None)  # the portable stepper's noise-drawing thread
    if close is not None:
        close()
    return {"accuracy": acc, "q": plan.q, "sigma": plan.sigma if private else 0.0, "steps": plan.steps,
            "clip_norm": plan.clip_norm}
