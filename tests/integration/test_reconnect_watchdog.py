"""A robust connection that missed the signal to reconnect does not stay down for good.

aio-pika's reconnect loop waits for a signal that the connection's close sends; when the
loop is not waiting yet, the signal is lost and the connection stays down with the broker
up (the rare stall once seen in the network-fault test). Here the signal is suppressed on
purpose, and the watchdog of ``ClosingRobustConnection`` must bring the connection back.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from yarl import URL

from arbiter.worker.broker import STALL_INTERVALS, ClosingRobustConnection
from arbiter.worker.settings import Settings

pytestmark = pytest.mark.integration

INTERVAL_S = 0.2


async def _close_without_reconnect_signal(self: aio_pika.Connection, closing: object) -> None:
    """The close handling of a plain connection: no reconnect is asked for."""
    await aio_pika.Connection._on_connection_close(self, closing)  # type: ignore[arg-type]


async def test_a_connection_that_missed_its_reconnect_signal_is_reconnected(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(  # before connecting: the close callback is bound then
        aio_pika.RobustConnection, "_on_connection_close", _close_without_reconnect_signal
    )
    url = URL(settings.amqp_url).update_query(reconnect_interval=INTERVAL_S)
    connection = await aio_pika.connect_robust(url, connection_class=ClosingRobustConnection)
    assert isinstance(connection, ClosingRobustConnection)
    try:
        assert connection.transport is not None
        await connection.transport.connection.close()
        assert not connection.connected.is_set()

        async with asyncio.timeout(INTERVAL_S * (STALL_INTERVALS + 2) + 5):
            await connection.connected.wait()
        assert connection.recoveries_requested >= 1
        channel = await connection.channel()  # and it works
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"back"), queue.name)
        async with asyncio.timeout(5):
            message = await queue.get(fail=False, timeout=5)
            while message is None:
                await asyncio.sleep(0.05)
                message = await queue.get(fail=False, timeout=5)
        assert message.body == b"back"
    finally:
        await connection.close()


async def test_a_connection_that_stays_up_is_never_nudged(settings: Settings) -> None:
    url = URL(settings.amqp_url).update_query(reconnect_interval=INTERVAL_S)
    connection = await aio_pika.connect_robust(url, connection_class=ClosingRobustConnection)
    assert isinstance(connection, ClosingRobustConnection)
    try:
        await asyncio.sleep(INTERVAL_S * (STALL_INTERVALS + 2))
        assert connection.recoveries_requested == 0
    finally:
        await connection.close()
