"""Grouping deliveries into batches: when a batch goes, and how many run at once.

A batch costs a fixed price whatever its size (PostgreSQL round trips, a flush, an ack:
mostly wake-ups of other processes), so on a busy worker larger batches are cheaper per
proposal. The policy is group commit: an idle worker settles a lone delivery at once;
while batches are in flight, what arrives gathers into the next batch, which goes when it
is full, when no batch is in flight any more (the worker would otherwise idle), or after
``wait_s`` at most (so a batch held up, on a row locked elsewhere say, holds the rest no
longer). A backlog fills batches at once and keeps up to ``concurrency`` of them in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Takes items one by one and settles them in batches, ``concurrency`` at once."""

    def __init__(
        self,
        settle: Callable[[list[T]], Coroutine[Any, Any, None]],
        *,
        concurrency: int,
        batch_max: int,
        wait_s: float,
        window_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self._settle = settle
        self._batch_max = batch_max
        self._wait_s = wait_s
        self._window_full = window_full  # nothing more can arrive: waiting is pointless
        self._inbox: asyncio.Queue[T] = asyncio.Queue()
        self._slots = asyncio.Semaphore(concurrency)
        self.in_flight: set[asyncio.Task[None]] = set()
        self._all_finished: asyncio.Future[None] | None = None  # set while a batch fills

    def put(self, item: T) -> None:
        self._inbox.put_nowait(item)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize()

    async def run(self) -> None:
        """Take what waits as one batch whenever a slot is free; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = [await self._inbox.get()]
            except asyncio.CancelledError:
                self._slots.release()
                raise
            self._take_waiting(batch)
            if self._worth_waiting(batch):
                await self._fill(batch, loop.time() + self._wait_s)
            task = asyncio.create_task(self._settle(batch))
            self.in_flight.add(task)
            task.add_done_callback(self._batch_done)

    async def settled(self) -> None:
        """Until nothing waits and no batch is in flight."""
        while self.waiting or self.in_flight:
            if self.in_flight:
                await asyncio.gather(*list(self.in_flight), return_exceptions=True)
            else:
                await asyncio.sleep(0.01)

    async def _fill(self, batch: list[T], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        finished = self._all_finished = loop.create_future()
        try:
            while len(batch) < self._batch_max and not finished.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                arrival = asyncio.ensure_future(self._inbox.get())
                await asyncio.wait(
                    {arrival, finished}, timeout=remaining, return_when="FIRST_COMPLETED"
                )
                if not arrival.done():
                    arrival.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await arrival
                if arrival.done() and not arrival.cancelled():
                    batch.append(arrival.result())
                    self._take_waiting(batch)
        finally:
            self._all_finished = None

    def _take_waiting(self, batch: list[T]) -> None:
        while len(batch) < self._batch_max and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())

    def _worth_waiting(self, batch: list[T]) -> bool:
        return (
            self._wait_s > 0
            and len(batch) < self._batch_max
            and bool(self.in_flight)
            and not self._window_full()
        )

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self._slots.release()
        if not self.in_flight and self._all_finished and not self._all_finished.done():
            self._all_finished.set_result(None)
