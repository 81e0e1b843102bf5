"""What the ota tests share: the in-memory adapter service and test adapters; the real
Mosquitto (``broker``, ``mqtt``) is in tests/conftest.py, shared with the model matrix."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from benchmarks.mosquitto import DEVICES, FLEET_USER, Broker
from lorad.adapters.errors import AdapterNotFoundError
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.ota.target import ProbeSet
from tests.conftest import MAX_PACKET

__all__ = ["Broker", "DEVICES", "FLEET_USER", "MAX_PACKET"]


# --- in-memory adapter service and test adapters ----------------------------------------


FINGERPRINT = "sha256:" + "ab" * 32
DIM = 8


def make_adapter(seed: int, *, fingerprint: str = FINGERPRINT, rank: int = 2) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(rank=rank, alpha=4.0, base_fingerprint=fingerprint, weights={
        w: LoraWeights(A=rng.standard_normal((DIM, rank)).astype(np.float32),
                       B=rng.standard_normal((rank, DIM)).astype(np.float32))
        for w in ("layers.0.q.weight", "layers.0.v.weight")})


def reference_outputs(adapter: LoraAdapter | None, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the memory sink 'serves': x·Σ scale·A·B (a stand-in for the base model + LoRA)."""
    y = np.zeros((x.shape[0], DIM), np.float32)
    if adapter is not None:
        for w in adapter.weights.values():
            y += adapter.scale * (x @ w.A) @ w.B
    return {"y": y}


def probes_for(adapter: LoraAdapter) -> ProbeSet:
    x = np.linspace(-1, 1, 2 * DIM, dtype=np.float32).reshape(2, DIM)
    return ProbeSet(inputs={"x": x}, outputs=reference_outputs(adapter, x), atol=1e-3, rtol=1e-3)


class MemorySink:
    """AdapterService stand-in: versioned adapters per name, install/rollback/infer/delete.

    ``fail_install``: an exception the next installs raise (as the service would).
    """

    def __init__(self) -> None:
        self.versions: dict[str, list[LoraAdapter]] = {}
        self.current: dict[str, int] = {}
        self.installs: list[tuple[str, int, Mapping[str, object]]] = []
        self.fail_install: Exception | None = None
        self.corrupt_serving = False

    def install(self, name: str, adapter: LoraAdapter, *, meta: Mapping[str, object] = {}) -> Any:
        if self.fail_install is not None:
            raise self.fail_install
        self.versions.setdefault(name, []).append(adapter)
        self.current[name] = len(self.versions[name])
        self.installs.append((name, self.current[name], dict(meta)))
        return SimpleNamespace(name=name, version=self.current[name])

    def rollback(self, name: str, version: int) -> Any:
        assert 1 <= version <= len(self.versions[name])
        self.current[name] = version
        return SimpleNamespace(name=name, version=version)

    def delete(self, name: str) -> None:
        """Every stored version goes, as in the real service."""
        self.current.pop(name, None)
        self.versions.pop(name, None)

    def info(self, name: str) -> Any:
        if name not in self.current:
            raise AdapterNotFoundError(name)
        return SimpleNamespace(name=name, version=self.current[name])

    def serving(self, name: str) -> LoraAdapter | None:
        v = self.current.get(name)
        return None if v is None else self.versions[name][v - 1]

    def run(self, inputs: Mapping[str, np.ndarray], adapter: str | None = None) -> Any:
        a = self.serving(adapter) if adapter else None
        out = reference_outputs(a, inputs["x"])
        if self.corrupt_serving:
            out = {k: v + 1.0 for k, v in out.items()}
        return SimpleNamespace(outputs=out, adapter=adapter,
                               version=self.current.get(adapter) if adapter else None)


class Clock:
    """A settable clock for both sides: ``now()`` for devices, ``dt()`` for the fleet."""

    def __init__(self) -> None:
        self.t = float(int(datetime.datetime.now(datetime.UTC).timestamp()))

    def now(self) -> float:
        return self.t

    def dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.t, datetime.UTC)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def kit() -> SimpleNamespace:
    """Helpers shared by the ota tests (test modules cannot import conftest)."""
    return SimpleNamespace(make_adapter=make_adapter, probes_for=probes_for, MemorySink=MemorySink,
                           Clock=Clock, FINGERPRINT=FINGERPRINT, reference_outputs=reference_outputs)
