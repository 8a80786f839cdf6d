"""Acks coalesced into ``multiple`` acks where that is safe.

A batch's deliveries are answered together, so their acks arrive in the same turn of the
event loop. One ``basic.ack(multiple=True)`` on the highest of them settles them all with
one frame (one syscall here, one operation in the broker), but it also settles *every*
lower tag still unacked on the channel: deliveries of other batches still in their
transaction, or held through a database outage. So a multiple ack only ever names a tag
below which nothing is outstanding; the acks above an outstanding delivery go one by one
(never waiting for it: a held delivery must not hold the others' acks and fill the
prefetch window). A nack is sent at once and its tag counts as outstanding until then, so
a multiple ack can never swallow a delivery being given back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

__all__ = ["Acker"]


@dataclass
class _Channel:
    """One channel's deliveries: tags are per channel and increase with each delivery."""

    key: int
    outstanding: set[int] = field(default_factory=set)  # delivered, not yet acked or nacked
    ready: dict[int, tuple[AbstractIncomingMessage, asyncio.Future[None]]] = field(
        default_factory=dict
    )
    flushing: bool = False


class Acker:
    """Tracks the deliveries of each channel and sends their acks, coalesced."""

    def __init__(self) -> None:
        self._channels: dict[int, _Channel] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self.frames = 0  # acks and multiple acks sent: what the coalescing saves shows here

    @staticmethod
    def _key(message: AbstractIncomingMessage) -> int | None:
        """The delivery's channel, or None once it is closed (aio-pika then refuses even to
        name it; an ack or nack on it would fail anyway)."""
        try:
            return id(message.channel)
        except Exception:
            return None

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """A delivery arrived: until it is settled, no multiple ack may cover it."""
        key = self._key(message)
        if message.delivery_tag is not None and key is not None:
            channel = self._channels.setdefault(key, _Channel(key))
            channel.outstanding.add(message.delivery_tag)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack this delivery, with the others acked in the same turn where safe; returns once
        its ack is written (or raises what writing it raised)."""
        tag = message.delivery_tag
        key = self._key(message)
        channel = self._channels.get(key) if key is not None else None
        if tag is None or channel is None or tag not in channel.outstanding:
            await message.ack()  # not tracked (delivered before the acker knew): plainly
            self.frames += 1
            return
        done = asyncio.get_running_loop().create_future()
        channel.ready[tag] = (message, done)
        if not channel.flushing:
            channel.flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush, channel)
        await done

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Give the delivery back now; it stays outstanding until the nack is written."""
        key = self._key(message)
        try:
            await message.nack(requeue=requeue)
        finally:
            channel = self._channels.get(key) if key is not None else None
            if channel is not None and message.delivery_tag is not None:
                self._forget(channel, message.delivery_tag)

    def _forget(self, channel: _Channel, tag: int) -> None:
        channel.outstanding.discard(tag)
        idle = not channel.outstanding and not channel.ready
        if idle and self._channels.get(channel.key) is channel:
            del self._channels[channel.key]

    def _start_flush(self, channel: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._flush(channel))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, channel: _Channel) -> None:
        """Send what is ready: one multiple ack for the ready tags below every outstanding
        one, single acks for the rest. Acks that become ready meanwhile go in the next round."""
        ready: dict[int, tuple[AbstractIncomingMessage, asyncio.Future[None]]] = {}
        try:
            while channel.ready:
                ready, channel.ready = channel.ready, {}
                blocking = [t for t in channel.outstanding if t not in ready]
                floor = min(blocking) if blocking else None
                covered = sorted(t for t in ready if floor is None or t < floor)
                sends: list[tuple[list[int], bool]] = []
                if covered:
                    sends.append((covered, len(covered) > 1))
                sends.extend(([t], False) for t in sorted(ready) if t not in covered)
                for tags, multiple in sends:
                    error: Exception | None = None
                    try:
                        await ready[tags[-1]][0].ack(multiple=multiple)
                    except Exception as exc:  # each waiter gets its own ack's failure
                        error = exc
                    self.frames += 1
                    for tag in tags:
                        _, done = ready.pop(tag)
                        self._forget(channel, tag)
                        if done.done():
                            continue
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(error)
        finally:
            channel.flushing = False
            for _, done in [*ready.values(), *channel.ready.values()]:
                if not done.done():  # cancelled mid-flush (shutdown): nobody waits forever
                    done.cancel()
            channel.ready = {}
