"""What a stuck worker waits for: its tasks as chains of the coroutines they wait in."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = ["await_chain", "describe_tasks"]


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """``function (file:line)`` of each coroutine a task is suspended in, outermost first."""
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(chain) < 40:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            chain.append(type(awaited).__name__)
            break
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        chain.append(f"{frame.f_code.co_name} ({where})")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return chain


def describe_tasks(marked: Collection[asyncio.Task[Any]], mark: str = "batch") -> str:
    """Every task of the running loop but the caller's, one line each, those in ``marked``
    labelled ``mark``."""
    ours = {id(task) for task in marked}
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        label = mark if id(task) in ours else "task"
        lines.append(f"{label} {task.get_name()}: {' > '.join(await_chain(task))}")
    return "\n".join(sorted(lines)) or "no task"
