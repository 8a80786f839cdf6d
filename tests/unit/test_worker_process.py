"""How a worker process runs: on uvloop when it is installed (ARBITER_EVENT_LOOP), else on
asyncio's loop, and with the garbage collector tuned for many short-lived objects."""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest

from arbiter.worker.runtime import GC_GEN0_THRESHOLD, ServiceError, loop_factory, run, tune_gc
from arbiter.worker.settings import Settings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_the_worker_on_uvloop_when_it_is_installed() -> None:
    assert run(_loop_module(), Settings(event_loop="auto")).startswith("uvloop")


def test_asyncio_runs_it_on_the_standard_librarys_loop() -> None:
    assert run(_loop_module(), Settings(event_loop="asyncio")).startswith("asyncio")


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_factory("auto") is None


def test_uvloop_asked_for_and_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ServiceError, match="ARBITER_EVENT_LOOP=uvloop"):
        loop_factory("uvloop")


def test_a_value_that_is_no_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        Settings(event_loop="trio")


def test_a_worker_process_collects_its_youngest_generation_less_often() -> None:
    """``tune_gc`` (called by ``arbiter worker`` once started): a proposal's thousands of
    allocations no longer trigger several collections each, and start-up objects are
    frozen out of every scan."""
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert 10 * before[0] < GC_GEN0_THRESHOLD
        assert gc.get_freeze_count() > frozen
        assert gc.isenabled()  # cycles are still freed
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
