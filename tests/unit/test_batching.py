"""When a batch goes: at once on an idle worker; while batches are in flight, when it is
full, when none is in flight any more, or after the wait at most (group commit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arbiter.worker.batching import Batcher


class Settler:
    """Records each batch it is given and holds it until the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.releases: list[asyncio.Event] = []
        self.started = asyncio.Event()
        self.running = 0
        self.most_at_once = 0

    async def settle(self, batch: list[int]) -> None:
        release = asyncio.Event()
        self.batches.append(batch)
        self.releases.append(release)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            await release.wait()
        finally:
            self.running -= 1

    async def next_batch(self, count: int) -> list[int]:
        """Wait until ``count`` batches have started; the last one."""
        async with asyncio.timeout(2):
            while len(self.batches) < count:
                self.started.clear()
                await self.started.wait()
        return self.batches[count - 1]

    def release(self, index: int) -> None:
        self.releases[index].set()

    def release_all(self) -> None:
        for release in self.releases:
            release.set()


@asynccontextmanager
async def running(batcher: Batcher[int]) -> AsyncIterator[Batcher[int]]:
    task = asyncio.create_task(batcher.run())
    try:
        yield batcher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def batcher_for(
    settler: Settler,
    *,
    concurrency: int = 4,
    batch_max: int = 64,
    wait_s: float = 10.0,
    window_full: bool = False,
) -> Batcher[int]:
    return Batcher(
        settler.settle,
        concurrency=concurrency,
        batch_max=batch_max,
        wait_s=wait_s,
        window_full=lambda: window_full,
    )


async def test_an_idle_worker_settles_a_lone_delivery_at_once() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=10.0)) as batcher:
        batcher.put(1)
        assert await settler.next_batch(1) == [1]
        settler.release_all()


async def test_deliveries_arriving_during_a_batch_go_together_when_it_finishes() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=10.0)) as batcher:
        batcher.put(1)
        await settler.next_batch(1)
        for item in (2, 3, 4):
            batcher.put(item)
            await turns()
        assert len(settler.batches) == 1  # gathering, though three slots are free
        settler.release(0)
        assert await settler.next_batch(2) == [2, 3, 4]
        settler.release_all()


async def test_a_filling_batch_waits_for_every_batch_in_flight_not_just_one() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=10.0)) as batcher:
        batcher.put(1)
        await settler.next_batch(1)
        for item in range(2, 2 + 64):  # a full batch goes at once, alongside the first
            batcher.put(item)
        assert len(await settler.next_batch(2)) == 64
        batcher.put(100)
        await turns()
        settler.release(0)
        await turns()
        assert len(settler.batches) == 2  # one is still in flight: keep gathering
        batcher.put(101)
        settler.release(1)
        assert await settler.next_batch(3) == [100, 101]
        settler.release_all()


async def test_a_batch_held_up_holds_the_others_no_longer_than_the_wait() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=0.05)) as batcher:
        batcher.put(1)
        await settler.next_batch(1)  # never released until the end: a row locked elsewhere
        batcher.put(2)
        batcher.put(3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await settler.next_batch(2) == [2, 3]
        assert 0.04 <= loop.time() - began < 1.0
        settler.release_all()


async def test_a_backlog_fills_batches_at_once_up_to_the_maximum_and_the_concurrency() -> None:
    settler = Settler()
    async with running(batcher_for(settler, concurrency=2, batch_max=3)) as batcher:
        for item in range(8):
            batcher.put(item)
        assert await settler.next_batch(1) == [0, 1, 2]
        assert await settler.next_batch(2) == [3, 4, 5]
        await turns()
        assert len(settler.batches) == 2  # both slots taken
        settler.release(0)
        settler.release(1)
        assert await settler.next_batch(3) == [6, 7]
        settler.release_all()
    assert settler.most_at_once == 2


async def test_a_full_prefetch_window_sends_what_waits_without_waiting() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=10.0, window_full=True)) as batcher:
        batcher.put(1)
        await settler.next_batch(1)
        batcher.put(2)
        assert await settler.next_batch(2) == [2]  # nothing more can arrive
        settler.release_all()


async def test_settled_returns_once_nothing_waits_and_nothing_is_in_flight() -> None:
    settler = Settler()
    async with running(batcher_for(settler, wait_s=0.01)) as batcher:
        batcher.put(1)
        await settler.next_batch(1)
        batcher.put(2)
        done = asyncio.create_task(batcher.settled())
        await turns()
        assert not done.done()
        settler.release(0)
        await settler.next_batch(2)
        settler.release(1)
        async with asyncio.timeout(2):
            await done
    assert settler.batches == [[1], [2]]
