"""A tiny encoder served by a real AdapterService, and a trainer environment around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.trainer.config import AdapterTrainingConfig
from lorad.trainer.example_store import ExampleStore
from lorad.trainer.ledger import PrivacyLedger
from lorad.trainer.noise import SeededNoise
from lorad.trainer.run import TrainerEnv

SEQ, D, CLASSES, RANK = 4, 32, 5, 4

_MODEL: onnx.ModelProto | None = None


def tiny_model() -> onnx.ModelProto:
    global _MODEL
    if _MODEL is None:
        _MODEL = build_reference_encoder(d_model=D, heads=2, ffn=64, seq_len=SEQ, num_classes=CLASSES)
    return _MODEL


def make_service(root: Path) -> AdapterService:
    engine = InferenceEngine(tiny_model(), targets=REFERENCE_TARGETS, rank=RANK)
    return AdapterService(engine, AdapterRegistry(root / "adapters"), cache_budget_bytes=1 << 24)


def teacher(service: AdapterService, *, seed: int = 7, scale: float = 0.5) -> LoraAdapter:
    """An adapter that changes the base model's answers a lot (labels come from it)."""
    rng = np.random.default_rng(seed)
    return LoraAdapter(
        rank=RANK, alpha=float(RANK), base_fingerprint=service.engine.fingerprint,
        weights={t.weight: LoraWeights((rng.normal(size=(t.in_features, RANK)) * scale).astype(np.float32),
                                       (rng.normal(size=(RANK, t.out_features)) * scale).astype(np.float32))
                 for t in service.engine.targets},
    )


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, SEQ, D)).astype(np.float32)


def labelled_by(service: AdapterService, adapter: LoraAdapter | None, x: np.ndarray) -> np.ndarray:
    prepared = service.engine.prepare(adapter, name="teacher", version=0) if adapter else None
    return service.engine.run({"x": x}, prepared)["logits"].argmax(axis=1)


def fill_store(store: ExampleStore, adapter: str, x: np.ndarray, labels: np.ndarray) -> None:
    for row, label in zip(x, labels, strict=True):
        store.add(adapter, {"x": row}, np.asarray(int(label), np.int64))


def make_env(root: Path, service: AdapterService, *, seed: int = 0, isolate: bool = False) -> TrainerEnv:
    trainer_dir = root / "trainer"
    trainer_dir.mkdir(parents=True, exist_ok=True)
    store = ExampleStore(trainer_dir / "examples.sqlite3", max_examples_per_adapter=10_000,
                         max_bytes=1 << 26, retention_days=30)
    ledger = PrivacyLedger(trainer_dir / "privacy-ledger.json")
    return TrainerEnv(service=service, store=store, ledger=ledger, state_dir=trainer_dir,
                      noise=SeededNoise(seed), rng=lambda: np.random.default_rng(seed), isolate=isolate)


def run_config(**changes: Any) -> AdapterTrainingConfig:
    settings: dict[str, Any] = dict(
        rank=RANK, alpha=8.0, noise_multiplier=0.5, batch_size=8.0, epochs=None, steps=12,
        learning_rate=0.01, target_epsilon=100.0, validation_margin=-10.0, checkpoint_every=5,
        min_train_examples=1, min_holdout_examples=1, gate_noise_multiplier=1.0, budget_fraction=1.0,
    )
    settings.update(changes)
    return AdapterTrainingConfig(**settings)


class CanaryRows:
    """A canary feed (trainer/portable.py's CanaryFeed) with fixed rows; keeps what it sees."""

    def __init__(self, rows: np.ndarray) -> None:
        self._rows = rows
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def rows(self) -> np.ndarray:
        return self._rows

    def observe(self, released: np.ndarray, examples: np.ndarray) -> None:
        self.seen.append((released, examples))
