"""lorad.adapters.micro_batcher: concurrent requests with different adapters in one call, each
answered exactly as a call of its own would be."""

from __future__ import annotations

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
