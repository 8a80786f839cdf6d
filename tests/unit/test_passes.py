"""Background loops stop between passes, never inside one."""

from __future__ import annotations

import asyncio

from arbiter.worker.passes import Passes


async def looping(passes: Passes, log: list[str], pass_s: float, pause_s: float) -> None:
    while not passes.stopping:
        async with passes.one():
            log.append("begin")
            await asyncio.sleep(pass_s)
            log.append("end")
        await asyncio.sleep(pause_s)


async def test_stopping_waits_for_the_pass_in_progress_then_ends_the_loop() -> None:
    passes, log = Passes(), list[str]()
    task = asyncio.create_task(looping(passes, log, pass_s=0.2, pause_s=0))
    await asyncio.sleep(0.05)  # inside the first pass
    await passes.stop(task, timeout_s=5)
    assert log == ["begin", "end"]
    assert task.done()


async def test_stopping_a_sleeping_loop_cancels_its_sleep_at_once() -> None:
    passes, log = Passes(), list[str]()
    task = asyncio.create_task(looping(passes, log, pass_s=0, pause_s=60))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await passes.stop(task, timeout_s=5)
    assert loop.time() - began < 1
    assert log == ["begin", "end"]


async def test_a_pass_longer_than_the_timeout_is_cancelled() -> None:
    passes, log = Passes(), list[str]()
    task = asyncio.create_task(looping(passes, log, pass_s=60, pause_s=0))
    await asyncio.sleep(0.05)
    await passes.stop(task, timeout_s=0.1)
    assert log == ["begin"]
    assert task.cancelled()
