"""The AMQP connection the worker and the client open."""

from __future__ import annotations

import contextlib

import aio_pika

__all__ = ["ClosingRobustConnection"]


class ClosingRobustConnection(aio_pika.RobustConnection):
    """A robust connection that closes itself when its first connect fails. aio-pika leaves
    such a connection open, to be closed from ``__del__`` as a task on whatever loop runs
    when it is collected: a task that never runs if that loop has stopped."""

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the override)
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise
