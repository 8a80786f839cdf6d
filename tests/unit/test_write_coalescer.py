"""The AMQP connection's writes: those made in one event-loop turn leave in one send."""

from __future__ import annotations

import asyncio

from arbiter.worker.broker import WriteCoalescer


class RecordingTransport(asyncio.WriteTransport):
    """A transport that records what reaches it, and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        self.events.append("send")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closing


async def _installed() -> tuple[RecordingTransport, WriteCoalescer]:
    transport = RecordingTransport()
    coalescer = WriteCoalescer(transport, asyncio.get_running_loop())
    coalescer.install()
    return transport, coalescer


async def test_writes_of_one_loop_turn_leave_in_one_send_in_their_order() -> None:
    transport, coalescer = await _installed()
    for frame in (b"publish-1", b"publish-2", b"ack"):
        transport.write(frame)
    assert transport.sent == []  # nothing leaves before the loop turns
    await asyncio.sleep(0)
    assert transport.sent == [b"publish-1publish-2ack"]
    assert (coalescer.writes, coalescer.sends) == (3, 1)


async def test_writes_of_later_turns_leave_in_sends_of_their_own() -> None:
    transport, coalescer = await _installed()
    transport.write(b"first")
    await asyncio.sleep(0)
    transport.write(b"second")
    await asyncio.sleep(0)
    assert transport.sent == [b"first", b"second"]
    assert coalescer.sends == 2


async def test_close_sends_what_is_pending_before_closing() -> None:
    """aiormq writes Connection.Close and closes soon after: the frame must not be lost."""
    transport, _ = await _installed()
    transport.write(b"connection.close")
    transport.close()
    assert transport.events == ["send", "close"]
    assert transport.sent == [b"connection.close"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert transport.sent == [b"connection.close"]


async def test_a_closed_transport_is_not_written_to() -> None:
    transport, coalescer = await _installed()
    transport.write(b"late frame")
    transport.closing = True  # the connection died meanwhile
    await asyncio.sleep(0)
    assert transport.sent == []
    assert coalescer.sends == 0


class SlottedTransport(asyncio.WriteTransport):
    """A transport whose instances take no new attributes."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))


async def test_a_transport_that_takes_no_attributes_is_left_writing_directly() -> None:
    transport = SlottedTransport()
    coalescer = WriteCoalescer(transport, asyncio.get_running_loop())
    assert coalescer.install() is False
    transport.write(b"frame")
    assert transport.sent == [b"frame"]  # written at once, as without the coalescer
