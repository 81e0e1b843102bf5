"""lorad.adapters.micro_batcher: concurrent requests with different adapters in one call, each
answered exactly as a call of its own would be; requests of one adapter (or none) batch on
the engine's own sessions, and the banks are made only when requests mix."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_banks import AdapterBanks
from lorad.adapters.micro_batcher import MicroBatcher
from tests.unit.lora_models import random_adapter, tiny_model

RANK = 4


@pytest.fixture()
def batcher() -> Iterator[MicroBatcher]:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=RANK)
    banks = AdapterBanks(engine.base_model, engine.targets, rank=RANK, slots=2)
    # A long wait: the batch is complete because every expected request arrived, not
    # because time passed.
    b = MicroBatcher(engine, banks, max_rows=8, max_wait_us=10_000_000)
    yield b
    b.close()
    b.close()  # safe twice


def _x(seed: int, rows: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3, 6)).astype(np.float32)


def test_expected_requests_share_one_call_and_get_their_own_rows(batcher: MicroBatcher) -> None:
    engine = batcher.engine
    prepared = [engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=s), name=f"a{s}", version=s)
                for s in (1, 2)]
    requests = [(_x(1), prepared[0]), (_x(2), None), (_x(3), prepared[1])]
    for _ in requests:
        batcher.expect()
    futures = [batcher.submit({"x": x}, p, expected=True) for x, p in requests]
    for (x, p), f in zip(requests, futures, strict=True):
        np.testing.assert_allclose(f.result(timeout=30)["y"], engine.run({"x": x}, p)["y"], rtol=1e-5, atol=1e-5)
    assert (batcher.batches, batcher.batched_requests) == (1, 3)
    assert batcher.banks.in_use() == {}  # slots released after the batch


def test_rows_slots_and_shapes_bound_a_batch(batcher: MicroBatcher) -> None:
    engine = batcher.engine
    prepared = [engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=1, seed=s), name=f"b{s}", version=1)
                for s in range(3)]
    # 3 adapters, 2 slots, 8 rows: two batches whatever the order of arrival.
    requests = [(_x(s, rows=2), p) for s, p in enumerate(prepared)] + [(_x(9, rows=4), None)]
    for _ in requests:
        batcher.expect()
    futures = [batcher.submit({"x": x}, p, expected=True) for x, p in requests]
    for (x, p), f in zip(requests, futures, strict=True):
        np.testing.assert_allclose(f.result(timeout=30)["y"], engine.run({"x": x}, p)["y"], rtol=1e-5, atol=1e-5)
    # a0, a1 and the base rows fill the first call; b2 finds no free slot and runs next.
    assert (batcher.batches, batcher.batched_requests) == (2, 4)


def test_an_error_reaches_every_request_of_the_batch(batcher: MicroBatcher) -> None:
    batcher.expect()
    with pytest.raises(ValueError, match="agree on the number of rows"):
        batcher.submit({"x": _x(1, rows=2), "z": np.zeros((3, 1), np.float32)}, None, expected=True)
    batcher.unexpect()
    f = batcher.submit({"x": _x(1)}, None)  # a lone request does not wait for the long timeout
    assert f.result(timeout=30)["y"].shape == (6, 4)


def test_one_adapter_or_none_runs_on_the_engine_and_the_banks_are_made_when_requests_mix() -> None:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=RANK)
    banks = AdapterBanks(engine.base_model, engine.targets, rank=RANK, slots=2, lazy=True)
    batcher = MicroBatcher(engine, banks, max_rows=64, max_wait_us=10_000_000)
    try:
        one = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=1), name="a", version=1)
        other = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=2), name="b", version=1)
        for adapter in (one, None):  # a batch of 3 requests with one adapter, then of 3 without
            requests = [_x(s) for s in range(3)]
            for _ in requests:
                batcher.expect()
            futures = [batcher.submit({"x": x}, adapter, expected=True) for x in requests]
            for x, f in zip(requests, futures, strict=True):
                np.testing.assert_allclose(f.result(timeout=30)["y"], engine.run({"x": x}, adapter)["y"], rtol=1e-5, atol=1e-5)
        assert batcher.counts() == (2, 6)
        assert not banks.opened
        for _ in range(2):
            batcher.expect()
        mixed = [batcher.submit({"x": _x(7)}, p, expected=True) for p in (one, other)]
        for p, f in zip((one, other), mixed, strict=True):
            np.testing.assert_allclose(f.result(timeout=30)["y"], engine.run({"x": _x(7)}, p)["y"], rtol=1e-5, atol=1e-5)
        assert banks.opened  # for the mixed batch
    finally:
        batcher.close()


def test_a_bank_slot_does_not_keep_a_dropped_adapter_alive() -> None:
    """A slot knows its adapter weakly: what the cache let go is freed, and the slot reused."""
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=RANK)
    banks = AdapterBanks(engine.base_model, engine.targets, rank=RANK, slots=1)
    first = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=1), name="a", version=1)
    slot = banks.acquire(first)
    assert slot == 1 and banks.acquire(first) == 1  # the same adapter finds its slot
    banks.release(1, 1)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
    second = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=2), name="a", version=2)
    assert banks.acquire(second) == 1
