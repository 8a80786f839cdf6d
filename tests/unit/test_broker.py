"""A broker connection that fails to open is closed there and then, not left to the
garbage collector (whose close would be a task on a loop that may have stopped)."""

from __future__ import annotations

import gc
import socket

import aio_pika
import pytest

from arbiter.worker.runtime import ServiceError, connect_broker
from arbiter.worker.settings import Settings


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_refused_first_connection_is_closed_at_once() -> None:
    url = f"amqp://arbiter:secret@127.0.0.1:{unused_port()}/"
    settings = Settings(amqp_url=url, database_url="postgresql+asyncpg://x@127.0.0.1/x")
    with pytest.raises(ServiceError, match="cannot reach RabbitMQ") as caught:
        await connect_broker(settings)
    assert "secret" not in str(caught.value)
    gc.collect()
    opened = [o for o in gc.get_objects() if isinstance(o, aio_pika.RobustConnection)]
    assert opened, "the failed connection is still referenced by the exception"
    assert all(connection.is_closed for connection in opened)
