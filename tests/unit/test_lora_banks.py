"""lorad.adapters.lora_banks and adapters.composition: mixed-adapter batches checked row by row
against the numpy reference of each row's own adapter, and compositions against merged
weights."""

from __future__ import annotations

import numpy as np
import pytest

from lorad.adapters.composition import AdapterWeight, compose
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_banks import AdapterBanks
from tests.unit.lora_models import random_adapter, tiny_model, tiny_reference

RANK = 4


@pytest.fixture(scope="module")
def setup() -> tuple[InferenceEngine, AdapterBanks, dict[str, np.ndarray]]:
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=RANK)
    return engine, AdapterBanks(engine.base_model, engine.targets, rank=RANK, slots=3), w


def test_each_row_runs_with_its_own_slot(setup: tuple[InferenceEngine, AdapterBanks, dict[str, np.ndarray]]) -> None:
    engine, banks, w = setup
    adapters = [random_adapter(engine.targets, engine.fingerprint, rank=r, seed=r) for r in (1, 2, 4)]
    prepared = [engine.prepare(a, name=f"a{i}", version=1) for i, a in enumerate(adapters)]
    slots = [banks.acquire(p) for p in prepared]
    assert sorted(s for s in slots if s is not None) == [1, 2, 3]
    x = np.random.default_rng(3).normal(size=(5, 3, 6)).astype(np.float32)
    # Rows 0 and 3 base model, the others one adapter each; fc2 sees [N*3, 5] rows.
    row_slots = np.array([0, slots[0], slots[1], 0, slots[2]], np.int64)
    y = banks.run({"x": x}, row_slots)["y"].reshape(5, 3, 4)
    expected = [None, adapters[0], adapters[1], None, adapters[2]]
    for n, adapter in enumerate(expected):
        ref = tiny_reference(w, x[n : n + 1], adapter)
        np.testing.assert_allclose(y[n], ref, rtol=1e-5, atol=1e-5)
    base = engine.run({"x": x[[0, 3]]}, None)["y"].reshape(2, 3, 4)
    np.testing.assert_array_equal(y[[0, 3]], base)  # the zero slot leaves the base model exact
    for s in slots:
        assert s is not None
        banks.release(s)


def test_a_slot_in_use_is_never_reused(setup: tuple[InferenceEngine, AdapterBanks, dict[str, np.ndarray]]) -> None:
    engine, banks, _ = setup
    prepared = [engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=s), name=f"b{s}", version=1)
                for s in range(5)]
    held = [banks.acquire(p) for p in prepared[:3]]
    assert None not in held and len(set(held)) == 3
    assert banks.acquire(prepared[3]) is None  # every slot is in use: the request waits
    assert banks.acquire(prepared[0]) == held[0]  # the same adapter shares its slot
    banks.release(held[0])
    assert banks.acquire(prepared[3]) is None  # held[0] is still used once
    banks.release(held[0])
    assert banks.acquire(prepared[3]) == held[0]  # now free, least recently used: reused
    assert banks.in_use() == {held[0]: 1, held[1]: 1, held[2]: 1}
    for s in held:
        assert s is not None
        banks.release(s)


def test_composition_is_the_exact_weighted_sum_of_deltas(setup: tuple[InferenceEngine, AdapterBanks, dict[str, np.ndarray]]) -> None:
    engine, _, w = setup
    a = random_adapter(engine.targets, engine.fingerprint, rank=1, seed=11, alpha=2.0)
    b = random_adapter(engine.targets, engine.fingerprint, rank=3, seed=12, alpha=6.0)
    composite = compose([(a, 1.0), (b, -0.5)], slot_rank=RANK)
    assert composite.rank == 4 and composite.scale == 1.0
    for weight in a.weights:
        merged = composite.weights[weight].A @ composite.weights[weight].B
        want = a.scale * a.weights[weight].A @ a.weights[weight].B - 0.5 * b.scale * b.weights[weight].A @ b.weights[weight].B
        np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)
    x = np.random.default_rng(4).normal(size=(2, 3, 6)).astype(np.float32)
    y = engine.run({"x": x}, engine.prepare(composite, name="a+b", version=0))["y"]
    np.testing.assert_allclose(y, tiny_reference(w, x, composite), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"total rank 1 \+ 3 \+ 1 = 5, more than the slot rank 4"):
        compose([(a, 1.0), (b, 1.0), (a, 1.0)], slot_rank=RANK)
    with pytest.raises(ValueError, match="finite numbers in"):
        AdapterWeight("a", float("inf"))
