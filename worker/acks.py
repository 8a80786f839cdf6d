"""Acks in bulk: one ``multiple`` ack settles every delivery up to a tag, once it is safe.

An ack is a frame to write and a command for the broker to apply, per delivery. Batches
settle many deliveries at once, so the worker tells the broker with one ack for the
longest run of deliveries (in delivery-tag order) that are all ready. A ``multiple`` ack
settles *every* unsettled delivery up to its tag on the channel, so it is only sent up to
the first delivery still being processed; a ready delivery held back behind a slow one
(a lock wait, say) is acked alone after ``HOLD_S``, so it never blocks its window slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

__all__ = ["Acker"]

log = logging.getLogger(__name__)

HOLD_S = 0.005


@dataclass
class _Channel:
    """The deliveries of one channel (tags restart on a new channel)."""

    unsettled: list[int] = field(default_factory=list)  # a heap of delivery tags
    ready: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)  # settled on their own (nacked, acked alone)


class Acker:
    """Tracks deliveries from receipt to settlement, and acks the ready ones in bulk."""

    def __init__(self) -> None:
        # Keyed by the channel object itself: tags restart on a new channel, and an id()
        # could be reused by one.
        self._channels: dict[object, _Channel] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False

    def _of(self, message: AbstractIncomingMessage) -> _Channel:
        return self._channels.setdefault(message.channel, _Channel())

    def received(self, message: AbstractIncomingMessage) -> None:
        """A delivery arrived; it is unsettled until acked or given back."""
        if message.delivery_tag is not None:
            heapq.heappush(self._of(message).unsettled, message.delivery_tag)

    def ack(self, message: AbstractIncomingMessage) -> None:
        """The delivery may be acked now (its outcome is confirmed); sent soon, in bulk."""
        tag = message.delivery_tag
        if tag is None:
            return
        self._of(message).ready[tag] = message
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def settled_alone(self, message: AbstractIncomingMessage) -> None:
        """The delivery was settled without this class (nacked): stop waiting for it."""
        if message.delivery_tag is not None:
            self._of(message).gone.add(message.delivery_tag)
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for channel in list(self._channels.values()):
            last = None
            while channel.unsettled and (
                channel.unsettled[0] in channel.ready or channel.unsettled[0] in channel.gone
            ):
                tag = heapq.heappop(channel.unsettled)
                if tag in channel.gone:
                    channel.gone.discard(tag)
                else:
                    last = channel.ready.pop(tag)
            if last is not None:
                self._send(last, multiple=True)
            if channel.ready:
                asyncio.get_running_loop().call_later(HOLD_S, self._release, channel)

    def _release(self, channel: _Channel) -> None:
        """Ack alone whatever is still held behind a delivery that is not ready."""
        for tag, message in list(channel.ready.items()):
            del channel.ready[tag]
            channel.gone.add(tag)
            self._send(message, multiple=False)

    def _send(self, message: AbstractIncomingMessage, *, multiple: bool) -> None:
        task = asyncio.create_task(self._ack(message, multiple))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _ack(message: AbstractIncomingMessage, multiple: bool) -> None:
        # An ack on a channel that is gone is moot: the broker redelivers, and the
        # redelivery replays the stored outcome.
        with contextlib.suppress(Exception):
            await message.ack(multiple=multiple)

    async def drain(self) -> None:
        """Send what is held and wait for every ack to be written (on shutdown)."""
        for channel in self._channels.values():
            self._release(channel)
        self._flush()
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
