"""lorad.adapters.micro_batcher: concurrent requests with different adapters in one call, each
answered exactly as a call of its own would be; requests of one adapter (or none) batch on
the engine's own sessions, and the banks are made only when requests mix."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine, PreparedAdapter
from lorad.adapters.lora_banks import AdapterBanks
from lorad.adapters.micro_batcher import MicroBatcher, PostWindow
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


# -- the event loop's window ------------------------------------------------------------


class _Turn:
    """A stand-in for the event loop's ``call_soon``: what is scheduled runs at end()."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []

    def end(self) -> None:
        pending = list(self.scheduled)
        self.scheduled.clear()  # the same list: the window holds its append
        for fn in pending:
            fn()


def _windowed(inline_us: int, *, slots: int = 2) -> tuple[MicroBatcher, list[PreparedAdapter]]:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=RANK)
    banks = AdapterBanks(engine.base_model, engine.targets, rank=RANK, slots=slots, lazy=True)
    prepared = [engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2, seed=s), name=f"w{s}", version=1)
                for s in range(4)]
    return MicroBatcher(engine, banks, max_rows=64, max_wait_us=10_000_000, inline_us=inline_us), prepared


def _answers(window: PostWindow, requests: list[tuple[np.ndarray, PreparedAdapter | None]]
             ) -> list[Future[tuple[dict[str, np.ndarray], str]]]:
    """Post each request; each future gets (outputs, name of the thread that answered)."""
    futures: list[Future[tuple[dict[str, np.ndarray], str]]] = []
    for x, p in requests:
        f: Future[tuple[dict[str, np.ndarray], str]] = Future()

        def deliver(out: dict[str, np.ndarray] | None, error: BaseException | None,
                    f: Future[tuple[dict[str, np.ndarray], str]] = f) -> None:
            if error is not None:
                f.set_exception(error)
            else:
                assert out is not None
                f.set_result((out, threading.current_thread().name))

        window.post({"x": x}, p, deliver)
        futures.append(f)
    return futures


def test_a_turns_requests_are_handed_over_together_and_run_in_one_call() -> None:
    batcher, prepared = _windowed(inline_us=0)  # never inline: the runner's thread
    try:
        turn = _Turn()
        window = batcher.window(turn.scheduled.append)
        requests = [(_x(1), prepared[0]), (_x(2), None), (_x(3), prepared[1])]
        futures = _answers(window, requests)
        assert len(turn.scheduled) == 1  # one flush for the turn, however many requests
        assert batcher.counts() == (0, 0) and not any(f.done() for f in futures)  # nothing handed over yet
        turn.end()
        for (x, p), f in zip(requests, futures, strict=True):
            out, thread = f.result(timeout=30)
            np.testing.assert_allclose(out["y"], batcher.engine.run({"x": x}, p)["y"], rtol=1e-5, atol=1e-5)
            assert thread == "lorad-batcher"
        assert batcher.counts() == (1, 3)
    finally:
        batcher.close()


def test_a_fast_model_runs_a_turns_batch_in_the_posting_thread_once_its_cost_is_known() -> None:
    batcher, prepared = _windowed(inline_us=1_000_000)
    try:
        turn = _Turn()
        window = batcher.window(turn.scheduled.append)
        here = threading.current_thread().name
        # The first batch has no cost to go by, and its adapters mix before the banks are
        # open: the runner runs it (opening them); the next turn's runs here, before end() returns.
        for expected_thread in ("lorad-batcher", here):
            requests = [(_x(4), prepared[0]), (_x(5), prepared[1]), (_x(6), None)]
            futures = _answers(window, requests)
            turn.end()
            for (x, p), f in zip(requests, futures, strict=True):
                out, thread = f.result(timeout=30)
                np.testing.assert_allclose(out["y"], batcher.engine.run({"x": x}, p)["y"], rtol=1e-5, atol=1e-5)
                assert thread == expected_thread
        assert batcher.counts() == (2, 6)
        assert batcher.banks.in_use() == {}
    finally:
        batcher.close()


def test_a_turn_whose_slots_are_all_held_elsewhere_goes_to_the_runner_and_runs_once_they_are_free() -> None:
    batcher, prepared = _windowed(inline_us=1_000_000, slots=2)
    try:
        turn = _Turn()
        window = batcher.window(turn.scheduled.append)
        warm = _answers(window, [(_x(1), prepared[0]), (_x(2), prepared[1])])
        turn.end()
        for f in warm:
            f.result(timeout=30)  # cost known, banks open
        held = [batcher.banks.acquire(p) for p in prepared[:2]]  # another batch holds both slots
        requests = [(_x(7), prepared[2]), (_x(8), prepared[3])]
        futures = _answers(window, requests)
        turn.end()  # neither finds a free slot: nothing runs here
        assert not any(f.done() for f in futures)
        batcher.banks.release(*held)
        with batcher._cond:  # as the end of a batch does
            batcher._cond.notify()
        for (x, p), f in zip(requests, futures, strict=True):
            out, thread = f.result(timeout=30)
            np.testing.assert_allclose(out["y"], batcher.engine.run({"x": x}, p)["y"], rtol=1e-5, atol=1e-5)
            assert thread == "lorad-batcher"
    finally:
        batcher.close()


def test_a_window_of_a_closed_batcher_answers_every_request_with_the_error() -> None:
    batcher, prepared = _windowed(inline_us=1_000_000)
    batcher.close()
    turn = _Turn()
    futures = _answers(batcher.window(turn.scheduled.append), [(_x(1), prepared[0]), (_x(2), None)])
    turn.end()
    for f in futures:
        with pytest.raises(RuntimeError, match="closed"):
            f.result(timeout=5)
