"""SIGHUP's adapter refresh: versions changed on disk by another process replace the cached ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.app import _refresh_adapters
from tests.unit.lora_models import random_adapter, tiny_model, tiny_reference

X = np.random.default_rng(7).normal(size=(2, 3, 6)).astype(np.float32)


def test_changed_versions_are_dropped_and_pins_kept(tmp_path: Path) -> None:
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20)
    t, fp = engine.targets, engine.fingerprint
    v1, v2 = random_adapter(t, fp, rank=2, seed=1), random_adapter(t, fp, rank=2, seed=2)
    service.upload("a", dump_peft(v1))
    service.upload("b", dump_peft(v1))
    service.upload("gone", dump_peft(v1))
    service.pin("a")
    service.load("b")
    service.load("gone")
    assert _refresh_adapters(service) == []  # nothing changed on disk

    # another process (a second registry on the same directory) installs and deletes
    other = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20)
    other.upload("a", dump_peft(v2))
    other.delete("gone")
    with service.cache.lease("a") as held:  # a request in flight keeps its version
        assert sorted(_refresh_adapters(service)) == ["a", "gone"]
        assert held.version == 1
    result = service.infer({"x": X}, "a")
    assert result.version == 2
    np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, v2), rtol=1e-5, atol=1e-5)
    entries = {e.name: e for e in service.cache.entries()}
    assert entries["a"].pinned and entries["a"].version == 2 and "gone" not in entries and "b" in entries


def test_a_cached_adapter_damaged_on_disk_is_dropped(tmp_path: Path) -> None:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20)
    service.upload("a", dump_peft(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=1)))
    service.pin("a")
    (tmp_path / "adapters" / "a" / "current").write_bytes(b"garbage")
    assert _refresh_adapters(service) == ["a"]
    assert service.cache.entries() == []
