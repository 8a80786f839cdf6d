"""The AMQP connection's writes: those made in one event-loop turn, and in the turns right
after it, leave in one send once the loop turns without a new write (or after
``MAX_DEFERRALS`` busy turns)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from arbiter.worker.broker import MAX_DEFERRALS, WriteCoalescer


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

    def write_eof(self) -> None:
        self.events.append("eof")

    def can_write_eof(self) -> bool:
        return True


_writers: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
def _close_writers() -> Iterator[None]:
    """Close every writer a test made (one left open warns when collected)."""
    yield
    while _writers:
        _writers.pop().close()


def writer_over(transport: asyncio.WriteTransport) -> asyncio.StreamWriter:
    """A StreamWriter over ``transport``, as aiormq's transport factory returns one."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    _writers.append(writer)
    return writer


async def turns(count: int) -> None:
    """Let the event loop go round ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)


async def _installed() -> tuple[RecordingTransport, asyncio.StreamWriter, WriteCoalescer]:
    transport = RecordingTransport()
    writer = writer_over(transport)
    coalescer = WriteCoalescer(transport, asyncio.get_running_loop())
    coalescer.install(writer)
    return transport, writer, coalescer


async def test_writes_of_one_loop_turn_leave_in_one_send_in_their_order() -> None:
    transport, writer, coalescer = await _installed()
    for frame in (b"publish-1", b"publish-2", b"ack"):
        writer.write(frame)
    assert transport.sent == []  # nothing leaves before the loop turns
    await turns(2)  # one turn to see no new write, one to send
    assert transport.sent == [b"publish-1publish-2ack"]
    assert (coalescer.writes, coalescer.sends) == (3, 1)


async def test_writes_of_the_turns_right_after_join_the_same_send() -> None:
    """Outcomes read in one burst wake their executors over a few turns: their publishes
    still leave together."""
    transport, writer, coalescer = await _installed()
    for frame in (b"first", b"second", b"third"):
        writer.write(frame)
        await asyncio.sleep(0)
    assert transport.sent == []
    await turns(2)
    assert transport.sent == [b"firstsecondthird"]
    assert coalescer.sends == 1


async def test_a_write_every_turn_is_still_sent_after_a_few_turns() -> None:
    transport, writer, _ = await _installed()
    for number in range(3 * (MAX_DEFERRALS + 1)):
        writer.write(b"%d," % number)
        await asyncio.sleep(0)
    await turns(2)
    assert len(transport.sent) >= 3  # never held back for long
    assert transport.sent[0] == b"".join(b"%d," % n for n in range(MAX_DEFERRALS + 1))
    assert b"".join(transport.sent) == b"".join(b"%d," % n for n in range(3 * (MAX_DEFERRALS + 1)))


async def test_writes_after_a_quiet_turn_leave_in_sends_of_their_own() -> None:
    transport, writer, coalescer = await _installed()
    writer.write(b"first")
    await turns(2)
    writer.write(b"second")
    await turns(2)
    assert transport.sent == [b"first", b"second"]
    assert coalescer.sends == 2


async def test_close_sends_what_is_pending_before_closing() -> None:
    """aiormq writes Connection.Close and closes soon after: the frame must not be lost."""
    transport, writer, _ = await _installed()
    writer.write(b"connection.close")
    writer.close()
    assert transport.events == ["send", "close"]
    assert transport.sent == [b"connection.close"]
    await turns(2)  # the scheduled flush finds nothing left to send
    assert transport.sent == [b"connection.close"]


async def test_end_of_file_sends_what_is_pending_first() -> None:
    transport, writer, _ = await _installed()
    writer.write(b"connection.close")
    assert writer.can_write_eof()  # passed through to the transport
    writer.write_eof()
    assert transport.events == ["send", "eof"]


async def test_a_closed_transport_is_not_written_to() -> None:
    transport, writer, coalescer = await _installed()
    writer.write(b"late frame")
    transport.closing = True  # the connection died meanwhile
    assert writer.is_closing()  # asked of the transport itself
    await turns(2)
    assert transport.sent == []
    assert coalescer.sends == 0


class SlottedTransport(asyncio.WriteTransport):
    """A transport whose instances take no new attributes, as uvloop's do."""

    __slots__ = ("closed", "sent")

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_a_transport_that_takes_no_attributes_is_coalesced_too() -> None:
    transport = SlottedTransport()
    writer = writer_over(transport)
    WriteCoalescer(transport, asyncio.get_running_loop()).install(writer)
    writer.write(b"frame-1")
    writer.write(b"frame-2")
    assert transport.sent == []
    await turns(2)
    assert transport.sent == [b"frame-1frame-2"]
