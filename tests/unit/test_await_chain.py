"""What a drain that timed out logs: each task as the chain of coroutines it waits in."""

from __future__ import annotations

import asyncio

from arbiter.worker.diagnostics import await_chain


async def _inner(event: asyncio.Event) -> None:
    await event.wait()


async def _outer(event: asyncio.Event) -> None:
    await _inner(event)


async def test_a_suspended_task_is_described_outermost_first_down_to_what_it_awaits() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(_outer(event))
    await asyncio.sleep(0)
    chain = await_chain(task)
    names = [link.split(" ")[0] for link in chain]
    assert names[:3] == ["_outer", "_inner", "wait"]
    assert "test_await_chain.py" in chain[0]
    event.set()
    await task
