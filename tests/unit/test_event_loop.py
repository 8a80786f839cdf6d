"""ARBITER_EVENT_LOOP: the worker runs on uvloop when it is installed, else on asyncio's loop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from arbiter.worker.runtime import ServiceError, loop_factory, run
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
