"""The acker: one ``multiple`` ack for the longest run of ready deliveries, never past one
still being processed; a ready delivery held behind a slow one is acked alone soon after."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from worker.acks import HOLD_S, Acker


@dataclass(eq=False)
class Channel:
    """The acks a fake channel was sent, as (tag, multiple)."""

    sent: list[tuple[int, bool]] = field(default_factory=list)


@dataclass
class Delivery:
    channel: Channel
    delivery_tag: int

    async def ack(self, multiple: bool = False) -> None:
        self.channel.sent.append((self.delivery_tag, multiple))


def deliveries(acker: Acker, channel: Channel, count: int) -> list[AbstractIncomingMessage]:
    received = [cast(Any, Delivery(channel, tag)) for tag in range(1, count + 1)]
    for message in received:
        acker.received(message)
    return cast(list[AbstractIncomingMessage], received)


async def settle() -> None:
    """Let the acker's scheduled flushes and ack tasks run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_deliveries_ready_together_are_acked_with_one_multiple_ack() -> None:
    acker, channel = Acker(), Channel()
    messages = deliveries(acker, channel, 4)
    for message in reversed(messages):
        acker.ack(message)
    await settle()
    assert channel.sent == [(4, True)]


async def test_a_ready_delivery_is_never_acked_in_bulk_past_one_still_processing() -> None:
    acker, channel = Acker(), Channel()
    first, second, third = deliveries(acker, channel, 3)
    acker.ack(first)
    acker.ack(third)
    await settle()
    assert channel.sent == [(1, True)]
    await asyncio.sleep(HOLD_S * 3)
    assert channel.sent == [(1, True), (3, False)]
    acker.ack(second)
    await settle()
    assert channel.sent == [(1, True), (3, False), (2, True)]


async def test_a_delivery_given_back_does_not_hold_the_ones_after_it() -> None:
    acker, channel = Acker(), Channel()
    first, second = deliveries(acker, channel, 2)
    acker.settled_alone(first)
    acker.ack(second)
    await settle()
    assert channel.sent == [(2, True)]


async def test_channels_are_tracked_apart() -> None:
    acker, old, new = Acker(), Channel(), Channel()
    [stale] = deliveries(acker, old, 1)
    [fresh] = deliveries(acker, new, 1)
    acker.ack(fresh)
    await settle()
    assert new.sent == [(1, True)]
    assert old.sent == []
    acker.ack(stale)
    await settle()
    assert old.sent == [(1, True)]


async def test_drain_sends_whatever_is_held() -> None:
    acker, channel = Acker(), Channel()
    _, second = deliveries(acker, channel, 2)
    acker.ack(second)
    await acker.drain()
    assert channel.sent == [(2, False)]
