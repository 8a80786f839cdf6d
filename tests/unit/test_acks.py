"""Acks coalesce into multiple acks only where no outstanding delivery could be swallowed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from arbiter.worker.acks import Acker


class Wire:
    """What the broker would receive on one channel, in order."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.fail_acks = False
        self.closed = False


class FakeMessage:
    def __init__(self, channel: Wire, tag: int) -> None:
        self._channel = channel
        self.delivery_tag = tag

    @property
    def channel(self) -> Wire:
        """As aio-pika's: naming a closed channel raises."""
        if self._channel.closed:
            raise ConnectionError("channel closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        await asyncio.sleep(0)  # a write takes a turn of the loop
        if self._channel.fail_acks or self._channel.closed:
            raise ConnectionError("channel closed")
        self._channel.frames.append(("ack", self.delivery_tag, multiple))

    async def nack(self, requeue: bool = True) -> None:
        await asyncio.sleep(0)
        self._channel.frames.append(("nack", self.delivery_tag, requeue))


def deliver(acker: Acker, wire: Wire, *tags: int) -> list[AbstractIncomingMessage]:
    messages = [cast(AbstractIncomingMessage, FakeMessage(wire, tag)) for tag in tags]
    for message in messages:
        acker.delivered(message)
    return messages


def acked(wire: Wire) -> set[int]:
    """Every tag the frames settle, as the broker would count them."""
    settled: set[int] = set()
    for kind, tag, flag in wire.frames:
        if kind == "ack" and flag:
            settled |= set(range(1, tag + 1))
        else:
            settled.add(tag)
    return settled


async def test_a_batch_acked_together_is_one_multiple_ack() -> None:
    acker, wire = Acker(), Wire()
    messages = deliver(acker, wire, 1, 2, 3, 4)
    await asyncio.gather(*(acker.ack(m) for m in messages))
    assert wire.frames == [("ack", 4, True)]
    assert acker.frames == 1


async def test_acks_above_an_outstanding_delivery_go_one_by_one() -> None:
    """Tag 1 is still in its transaction: a multiple ack on 3 would settle it too."""
    acker, wire = Acker(), Wire()
    _, second, third = deliver(acker, wire, 1, 2, 3)
    await asyncio.gather(acker.ack(second), acker.ack(third))
    assert sorted(wire.frames) == [("ack", 2, False), ("ack", 3, False)]
    assert acked(wire) == {2, 3}


async def test_acks_below_an_outstanding_delivery_coalesce_up_to_it() -> None:
    acker, wire = Acker(), Wire()
    first, second, _, fourth = deliver(acker, wire, 1, 2, 3, 4)
    await asyncio.gather(acker.ack(first), acker.ack(second), acker.ack(fourth))
    assert wire.frames == [("ack", 2, True), ("ack", 4, False)]
    assert acked(wire) == {1, 2, 4}


async def test_a_delivery_being_nacked_is_never_covered_by_a_multiple_ack() -> None:
    acker, wire = Acker(), Wire()
    first, second, third = deliver(acker, wire, 1, 2, 3)
    await asyncio.gather(acker.nack(second, requeue=True), acker.ack(first), acker.ack(third))
    assert ("nack", 2, True) in wire.frames
    for kind, tag, multiple in wire.frames:
        if kind == "ack" and multiple:
            assert tag < 2 or wire.frames.index(("nack", 2, True)) < wire.frames.index(
                (kind, tag, multiple)
            )
    assert acked(wire) >= {1, 3}


async def test_after_a_nack_the_rest_coalesce_again() -> None:
    acker, wire = Acker(), Wire()
    first, second, third = deliver(acker, wire, 1, 2, 3)
    await acker.nack(first, requeue=True)
    await asyncio.gather(acker.ack(second), acker.ack(third))
    assert wire.frames == [("nack", 1, True), ("ack", 3, True)]


async def test_an_ack_that_fails_fails_each_of_its_waiters() -> None:
    acker, wire = Acker(), Wire()
    messages = deliver(acker, wire, 1, 2)
    wire.fail_acks = True
    results = await asyncio.gather(*(acker.ack(m) for m in messages), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_delivery_the_acker_never_saw_is_acked_plainly() -> None:
    acker, wire = Acker(), Wire()
    message = cast(AbstractIncomingMessage, FakeMessage(wire, 7))
    await acker.ack(message)
    assert wire.frames == [("ack", 7, False)]


async def test_channels_are_tracked_apart() -> None:
    """Tags are per channel: an outstanding tag on one never blocks the other's."""
    acker, a, b = Acker(), Wire(), Wire()
    deliver(acker, a, 1)  # outstanding on channel a
    on_b = deliver(acker, b, 1, 2)
    await asyncio.gather(*(acker.ack(m) for m in on_b))
    assert b.frames == [("ack", 2, True)]
    assert a.frames == []


async def test_acks_that_arrive_during_a_flush_go_in_the_next_round() -> None:
    acker, wire = Acker(), Wire()
    first, second = deliver(acker, wire, 1, 2)
    first_ack = asyncio.create_task(acker.ack(first))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flush has started writing tag 1's ack
    await asyncio.gather(first_ack, acker.ack(second))
    assert acked(wire) == {1, 2}
    assert all(tag in (1, 2) for _, tag, _ in wire.frames)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]])
async def test_every_tag_is_settled_exactly_once_whatever_the_order(order: list[int]) -> None:
    acker, wire = Acker(), Wire()
    messages = deliver(acker, wire, 1, 2, 3, 4, 5)
    tasks: list[Any] = []
    for index in order:
        tasks.append(asyncio.create_task(acker.ack(messages[index])))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert acked(wire) == {1, 2, 3, 4, 5}
    singles = [tag for kind, tag, multiple in wire.frames if not multiple]
    assert len(singles) == len(set(singles))


async def test_a_channel_closed_before_the_flush_fails_the_acks_instead_of_hanging() -> None:
    """The flush never names a message's channel: aio-pika raises once it is closed."""
    acker, wire = Acker(), Wire()
    messages = deliver(acker, wire, 1, 2)
    acks = [asyncio.create_task(acker.ack(m)) for m in messages]
    await asyncio.sleep(0)  # both are waiting for the flush
    wire.closed = True
    results = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), 1)
    assert all(isinstance(r, ConnectionError) for r in results)
