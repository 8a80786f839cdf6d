"""A worker publishes its answers on several confirming channels in turn, and the frames
of one loop turn leave the socket together (``worker/broker.py``, ``Publisher.send``)."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import aiormq
import pytest
from aiormq import spec

from arbiter.rules.context import OutboxMessage
from arbiter.worker import broker
from arbiter.worker.broker import PERSISTENT, ClosingRobustConnection, ConfirmingChannels
from arbiter.worker.publisher import Publisher
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology

pytestmark = pytest.mark.integration


async def test_answers_spread_over_channels_arrive_confirmed_and_leave_coalesced(
    settings: Settings,
) -> None:
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    assert isinstance(connection, ClosingRobustConnection)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        publisher = Publisher(settings, topology, await ConfirmingChannels.open(connection, 8))
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind(topology.outcomes_exchange, routing_key=replies.name)
        coalescer = connection.transport_factory.coalescer
        assert coalescer is not None
        writes, sends = coalescer.writes, coalescer.sends

        ids = [str(uuid.uuid4()) for _ in range(200)]
        await asyncio.gather(
            *(
                publisher.send(
                    topology.outcomes_exchange,
                    message_id.encode(),
                    spec.Basic.Properties(delivery_mode=PERSISTENT, message_id=message_id),
                    replies.name,
                )
                for message_id in ids
            )
        )  # each send returned once the broker confirmed it

        assert coalescer.writes - writes >= 200
        assert coalescer.sends - sends <= (coalescer.writes - writes) // 4
        received = []
        async with replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                received.append(message.body.decode())
                if len(received) == len(ids):
                    break
        assert sorted(received) == sorted(ids)
        assert await _empty(replies) == []  # each answer published once
    finally:
        began = time.monotonic()
        await connection.close()
        # Close-Ok came back: the coalesced Connection.Close frame was sent, not dropped.
        assert time.monotonic() - began < 2.0


async def _empty(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Whatever the queue still holds (nothing, when every answer was published once)."""
    left = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        left.append(message)
    return left


async def test_a_publish_on_a_closed_channel_fails_for_the_caller_to_retry(
    settings: Settings,
) -> None:
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        closed = await connection.channel(publisher_confirms=True)
        await closed.close()
        publisher = Publisher(settings, topology, ConfirmingChannels([closed]))
        with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
            await publisher.send(
                topology.outcomes_exchange, b"{}", spec.Basic.Properties(), "nowhere"
            )
    finally:
        await connection.close()


async def test_a_publish_whose_frame_cannot_leave_fails_after_the_bound(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish begun just before its connection died waited for good on aiormq's write
    queue, whose writer was gone (a stopping worker's drain then hung until SIGKILL). It now
    fails after ``PUBLISH_TIMEOUT_S``, for the caller to retry on the restored channel."""
    monkeypatch.setattr(broker, "PUBLISH_TIMEOUT_S", 0.3)
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        stuck: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
        stuck.put_nowait(object())  # full, and nothing will ever take from it
        monkeypatch.setattr(underlay, "write_queue", stuck)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await ConfirmingChannels([channel]).publish(
                "", b"{}", spec.Basic.Properties(delivery_mode=PERSISTENT), "nowhere"
            )
        assert time.monotonic() - began < 3.0
    finally:
        monkeypatch.undo()
        await connection.close()


async def test_an_event_nobody_subscribes_to_is_not_returned_but_a_lost_task_run_is(
    settings: Settings,
) -> None:
    """Events are published non-mandatory: with no queue bound the broker drops them
    without a Basic.Return each; a deferred task run stays mandatory."""
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        channels = await ConfirmingChannels.open(connection, 2)
        returned: list[str] = []
        for publishing in channels.channels:
            publishing.return_callbacks.add(
                lambda _, message: returned.append(message.routing_key or "")
            )
        publisher = Publisher(settings, topology, channels)
        unbound = f"nobody.listens.{uuid.uuid4().hex}"
        await publisher.outbox(
            [
                OutboxMessage("event", unbound, {"event": "x"}, str(uuid.uuid4())),
                OutboxMessage("task_run", unbound, {"id": "y"}, str(uuid.uuid4())),
            ]
        )
        await asyncio.sleep(0.2)  # a Basic.Return precedes its confirm; allow for the callback
        assert returned == [unbound]  # the task run's, not the event's
    finally:
        await connection.close()


async def test_each_publish_gets_its_own_confirm_whichever_path_it_took(
    settings: Settings,
) -> None:
    """Publishes queued directly (``worker/frames.py``) and publishes that went through
    aiormq's own path (its channel lock held) share one channel's delivery tags. A queue
    that takes 8 messages and nacks the rest shows each confirm reached its own publish:
    the publishes confirmed are exactly the messages the queue holds."""
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 8, "x-overflow": "reject-publish"}
        )
        channels = ConfirmingChannels([channel])
        underlay = await channel.get_underlay_channel()
        lock = underlay._Channel__lock  # type: ignore[attr-defined]

        async def publish(number: int) -> bool:
            try:
                await channels.publish(
                    "",
                    str(number).encode(),
                    spec.Basic.Properties(delivery_mode=PERSISTENT, message_id=str(number)),
                    queue.name,
                )
            except aiormq.exceptions.DeliveryError:
                return False
            return True

        await lock.acquire()  # the first six wait behind it, on aiormq's path
        waiting = [asyncio.create_task(publish(number)) for number in range(6)]
        await asyncio.sleep(0.05)
        lock.release()
        direct = [asyncio.create_task(publish(number)) for number in range(6, 16)]
        confirmed = await asyncio.gather(*waiting, *direct)

        assert sum(confirmed) == 8
        held = sorted(int(message.body) for message in await _empty(queue))
        assert held == [number for number, ok in enumerate(confirmed) if ok]
    finally:
        await connection.close()


async def test_a_body_larger_than_a_frame_arrives_whole(settings: Settings) -> None:
    """A body past the negotiated frame size leaves in several body frames (the direct
    path splits it as aiormq does) and the broker delivers it whole."""
    connection = await aio_pika.connect_robust(
        settings.amqp_url, connection_class=ClosingRobustConnection
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        body = bytes(range(256)) * (3 * underlay.max_content_size // 256 + 7)
        assert len(body) > 3 * underlay.max_content_size
        await ConfirmingChannels([channel]).publish(
            "", body, spec.Basic.Properties(delivery_mode=PERSISTENT, message_id="big"), queue.name
        )
        [message] = await _empty(queue)
        assert message.body == body
        assert message.message_id == "big"
    finally:
        await connection.close()
