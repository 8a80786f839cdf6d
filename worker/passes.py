"""Stopping a background loop (re-evaluation, sweeps, the purge) between its passes, never
inside one: a cancel in the middle of a transaction leaves its connection to the garbage
collector and the pass's answers half published (the next worker would redo them, but
nothing should depend on that at every shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["Passes"]


class Passes:
    """A loop runs each pass in ``one()`` and ends when ``stopping``; ``stop()`` waits for
    the pass in progress (up to a timeout), then cancels the loop where it sleeps."""

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = False

    @contextlib.asynccontextmanager
    async def one(self) -> AsyncIterator[None]:
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    async def stop(self, task: asyncio.Task[None], timeout_s: float) -> None:
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
