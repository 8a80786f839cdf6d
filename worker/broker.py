"""The AMQP connection the worker and the client open."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from arbiter.worker.frames import can_send_now, send_publish, widen_write_queue

__all__ = [
    "PERSISTENT",
    "ClosingRobustConnection",
    "CoalescingTransportFactory",
    "ConfirmingChannels",
    "WriteCoalescer",
]

PERSISTENT = 2  # delivery_mode of every message Arbiter publishes
# A connection down this many reconnect intervals in a row is asked to reconnect again.
STALL_INTERVALS = 3
# The longest one publish may take, its write and its confirm. aiormq queues a frame for
# its connection's writer; a publish begun just before the connection died waited on that
# queue for good (its writer gone), and held a stopping worker's drain until SIGKILL.
PUBLISH_TIMEOUT_S = 5.0
# Loop turns in a row with new writes that a coalescer waits before it sends anyway.
MAX_DEFERRALS = 3

log = logging.getLogger(__name__)


class WriteCoalescer:
    """Joins the writes made to a transport within one event-loop iteration into one send.

    aiormq writes every frame (a publish, an ack) with its own ``transport.write``, and on
    an idle socket each write is a ``send`` system call: a batch's 64 outcomes cost 64 of
    them, a fifth of the worker's CPU in the drain profile. Buffered until the loop turns
    once without a new write (at most ``MAX_DEFERRALS`` turns), the frames that a batch's
    publishes and acks queue together leave in one call, in their order, and so do the
    proposals of executors that a burst of outcomes wakes over a few turns (RabbitMQ CPU
    per transition 0.45-0.46 -> 0.39-0.40 ms with 32 executors); what comes alone waits two
    loop turns, microseconds.
    ``close`` and ``write_eof`` flush first, so a Connection.Close frame written just
    before is sent.

    It stands between aiormq's ``StreamWriter`` and the transport, passing everything else
    through, so it works whatever the transport's class: asyncio's, or uvloop's, whose
    instances take no new attributes (and whose own writes go out one by one)."""

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._fresh = False
        self._deferrals = 0
        self.sends = 0  # calls that reached the transport, for tests and measurement
        self.writes = 0

    def install(self, writer: asyncio.StreamWriter) -> None:
        """Put this coalescer between ``writer`` and its transport (the writer calls the
        transport it holds by attribute: ``write``, ``close``, ``is_closing``...)."""
        writer._transport = self  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        if not self._pending:
            self._loop.call_soon(self._flush_when_quiet)
            self._deferrals = 0
        self._fresh = True
        self._pending.append(bytes(data))

    def _flush_when_quiet(self) -> None:
        if self._fresh and self._deferrals < MAX_DEFERRALS:
            self._fresh = False
            self._deferrals += 1
            self._loop.call_soon(self._flush_when_quiet)
            return
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if self._transport.is_closing():
            return  # the connection is gone: these frames die with it, as unsent ones do
        self.sends += 1
        self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()


class CoalescingTransportFactory(TransportFactory):
    """Opens the socket as aiormq would (TCP, or TLS for ``amqps``), then coalesces its
    writes. The last coalescer is kept for tests and measurement."""

    def __init__(self, url: URL) -> None:
        self._inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        self.coalescer: WriteCoalescer | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        coalescer = WriteCoalescer(writer.transport, asyncio.get_running_loop())
        coalescer.install(writer)
        self.coalescer = coalescer
        return reader, writer


class ClosingRobustConnection(aio_pika.RobustConnection):
    """A robust connection that coalesces its writes (``WriteCoalescer``), closes itself
    when its first connect fails, and does not stay down for want of a reconnect attempt.

    aio-pika leaves a connection whose first connect failed open, to be closed from
    ``__del__`` as a task on whatever loop runs when it is collected: a task that never runs
    if that loop has stopped. And its reconnect loop waits for a signal that the
    connection's close sends: about once in 40 runs of the network-fault test (aio-pika
    10.2) a worker logged "Reconnecting after 5 seconds" and then waited for good with the
    broker back, as if the signal had been lost (the likeliest reading; never caught in the
    act). So a watchdog asks for a reconnect when the connection has stayed down for
    ``STALL_INTERVALS`` reconnect intervals; while aio-pika is trying anyway, the request is
    one it has already had."""

    def __init__(self, url: URL, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        # aio-pika passes on only the parameters it knows; aiormq takes this one.
        self.transport_factory = CoalescingTransportFactory(self.url)
        self.kwargs["transport_factory"] = self.transport_factory
        self._watchdog: asyncio.Task[None] | None = None
        self.recoveries_requested = 0  # by the watchdog, for tests and logs

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the override)
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    async def close(self, *args: Any, **kwargs: Any) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await super().close(*args, **kwargs)

    async def _watch(self) -> None:
        down_for = 0
        while not (self.is_closed or self._close_called):
            await asyncio.sleep(self.reconnect_interval)
            down_for = 0 if self.connected.is_set() else down_for + 1
            if down_for >= STALL_INTERVALS:
                down_for = 0
                self.recoveries_requested += 1
                (log.info if self.recoveries_requested == 1 else log.debug)(
                    "the broker connection has been down for %d reconnect intervals: "
                    "asking for a reconnect",
                    STALL_INTERVALS,
                )
                self._request_recovery()


class ConfirmingChannels:
    """Confirming channels published on in turn, each publish awaiting its broker confirm.

    A publish is encoded and queued by ``worker/frames.py`` in the same call (about 70 µs
    of CPU a confirmed publish, against 140 through aiormq's ``basic_publish``), so the
    publishes of one loop turn queue together, whatever the channel count, and the
    connection's ``WriteCoalescer`` sends them at once. Behind a publish or RPC of aiormq's
    own, a publish takes aiormq's path in its turn. Either way the confirm is awaited and
    bounded by ``PUBLISH_TIMEOUT_S``: a frame lost with the connection fails it, and the
    caller retries. Properties are built directly (``aio_pika.Message`` costs 13 µs,
    ``spec.Basic.Properties`` 1 µs)."""

    def __init__(self, channels: list[AbstractChannel]) -> None:
        assert channels, "at least one channel"
        self.channels = channels
        self._turn = 0

    @classmethod
    async def open(cls, connection: AbstractConnection, count: int) -> ConfirmingChannels:
        return cls([await connection.channel(publisher_confirms=True) for _ in range(count)])

    async def publish(
        self,
        exchange: str,
        body: bytes,
        properties: spec.Basic.Properties,
        routing_key: str,
        *,
        mandatory: bool = True,
    ) -> None:
        self._turn = (self._turn + 1) % len(self.channels)
        channel = self.channels[self._turn]
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        widen_write_queue(underlay)
        if can_send_now(underlay):
            confirmation = send_publish(
                underlay, exchange, routing_key, properties, body, mandatory=mandatory
            )
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await confirmation
            return
        # Behind a publish or an RPC of aiormq's own, or a full write queue: in its turn.
        await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=False,
            timeout=PUBLISH_TIMEOUT_S,
        )
