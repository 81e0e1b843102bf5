"""Adapters and probe sets on the embedded demo model, for the ota tests that run the real
AdapterService (in process or in a device process)."""

from __future__ import annotations

import numpy as np

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter
from lorad.ota.target import ProbeSet
from tests.unit.lora_models import random_adapter

__all__ = ["demo_adapter", "demo_probes", "demo_logits"]


def demo_adapter(engine: InferenceEngine, seed: int) -> LoraAdapter:
    return random_adapter(engine.targets, engine.fingerprint, rank=4, seed=seed, alpha=8.0, scale=0.3)


def demo_logits(engine: InferenceEngine, adapter: LoraAdapter, x: np.ndarray) -> np.ndarray:
    """What the demo model answers on ``x`` with ``adapter``: the reference a device must match."""
    return engine.run({"pixels": x}, engine.prepare(adapter, name="reference", version=1))["logits"]


def demo_probes(engine: InferenceEngine, adapter: LoraAdapter) -> ProbeSet:
    """The fleet records what this version must answer (it holds the same base model)."""
    x = np.random.default_rng(7).random((4, 64), dtype=np.float32)
    return ProbeSet(inputs={"pixels": x}, outputs={"logits": demo_logits(engine, adapter, x)},
                    atol=1e-4, rtol=1e-4)
