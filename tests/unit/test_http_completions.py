"""daemon.http_api's hand-back of the batcher's finished futures to the event loop: every
outcome arrives, a batch finished together wakes the loop once, and an answer given in the
loop's own thread (a batch run there) is set at once."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from lorad.daemon.http_api import _Completions


def _count_wakes(loop: asyncio.AbstractEventLoop) -> list[None]:
    """Count the loop's wake-ups from other threads: one entry per call_soon_threadsafe."""
    wakes: list[None] = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        wakes.append(None)
        return call_soon_threadsafe(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    return wakes


def test_a_batch_finished_together_wakes_the_loop_once_and_every_outcome_arrives() -> None:
    async def main() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        wakes = _count_wakes(loop)
        done = _Completions(loop)
        futures: list[Future[int]] = [Future() for _ in range(6)]
        waiters = [done.wait(f) for f in futures]

        def batch() -> None:  # the batcher's thread: one batch, answered in a row
            for i, f in enumerate(futures):
                if i == 3:
                    f.set_exception(ValueError("row 3"))
                else:
                    f.set_result(i)

        thread = threading.Thread(target=batch)
        thread.start()
        thread.join()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        return results, len(wakes)

    results, wakes = asyncio.run(main())
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], ValueError) and str(results[3]) == "row 3"
    assert wakes == 1


def test_a_cancelled_waiter_is_skipped_and_later_batches_still_arrive() -> None:
    async def main() -> int:
        done = _Completions(asyncio.get_running_loop())
        first: Future[int] = Future()
        gone = done.wait(first)
        gone.cancel()  # the client went away
        first.set_result(1)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second: Future[int] = Future()
        waiter = done.wait(second)
        threading.Thread(target=second.set_result, args=(2,)).start()
        return await waiter

    assert asyncio.run(main()) == 2


def test_a_cancelled_future_cancels_its_waiter() -> None:
    async def main() -> None:
        done = _Completions(asyncio.get_running_loop())
        f: Future[int] = Future()
        waiter = done.wait(f)
        f.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_an_answer_given_in_the_loops_own_thread_is_set_at_once_without_a_wake_up() -> None:
    async def main() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        wakes = _count_wakes(loop)
        done = _Completions(loop)
        waiters = [loop.create_future() for _ in range(3)]
        done.deliver(waiters[0])(1, None)  # a batch run inline, in the loop
        done.deliver(waiters[1])(None, ValueError("row 1"))
        settled_at_once = [w.done() for w in waiters]
        thread = threading.Thread(target=done.deliver(waiters[2]), args=(3, None))  # the batcher's thread
        thread.start()
        thread.join()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        return [settled_at_once, *results], len(wakes)

    (settled, first, second, third), wakes = asyncio.run(main())
    assert settled == [True, True, False]
    assert first == 1 and isinstance(second, ValueError) and third == 3
    assert wakes == 1  # only the answer from the other thread woke the loop
