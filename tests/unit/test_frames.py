"""A publish encoded by ``worker/frames.py`` is byte for byte the publish aiormq would
send, and the channel internals it relies on are still where it looks for them."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect

import aiormq
import pytest
from aiormq import spec
from aiormq.abc import ChannelFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from arbiter.worker.frames import WRITE_QUEUE_FRAMES, publish_frames

short_text = st.text(max_size=40)
header_values = st.one_of(st.text(max_size=30), st.integers(-(2**31), 2**31 - 1), st.booleans())
properties = st.builds(
    spec.Basic.Properties,
    content_type=st.none() | short_text,
    content_encoding=st.none() | short_text,
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=20), header_values),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | short_text,
    reply_to=st.none() | short_text,
    expiration=st.none() | st.integers(1, 10**6).map(str),
    message_id=st.none() | short_text,
    timestamp=st.none()
    | st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2100, 1, 1)).map(
        lambda moment: moment.replace(microsecond=0, tzinfo=dt.UTC)
    ),
    message_type=st.none() | short_text,
    app_id=st.none() | short_text,
)


def aiormq_bytes(
    channel: int,
    max_body_frame: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: spec.Basic.Properties,
    body: bytes,
) -> bytes:
    """What ``aiormq.Channel.basic_publish`` queues for the same publish."""
    frames: list[object] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=props, body_size=len(body)),
    ]
    for start in range(0, len(body), max_body_frame):
        frames.append(ContentBody(body[start : start + max_body_frame]))
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    channel=st.integers(1, 2047),
    exchange=st.sampled_from(["", "arbiter.outcomes", "arbiter.proposals"]),
    routing_key=short_text,
    mandatory=st.booleans(),
    props=properties,
    body=st.binary(max_size=300),
    max_body_frame=st.sampled_from([7, 64, 131064]),
)
def test_a_publish_is_encoded_as_aiormq_encodes_it(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    props: spec.Basic.Properties,
    body: bytes,
    max_body_frame: int,
) -> None:
    ours = publish_frames(channel, max_body_frame, exchange, routing_key, mandatory, props, body)
    assert ours == aiormq_bytes(
        channel, max_body_frame, exchange, routing_key, mandatory, props, body
    )


def test_a_body_longer_than_a_frame_is_split_like_aiormq_splits_it() -> None:
    props = spec.Basic.Properties(delivery_mode=2, message_id="m")
    body = bytes(range(256)) * 10
    ours = publish_frames(5, 1000, "x", "k", True, props, body)
    assert ours == aiormq_bytes(5, 1000, "x", "k", True, props, body)
    assert ours.count(b"\x03\x00\x05") >= 3  # three body frames on channel 5


def test_a_short_string_past_255_bytes_is_refused() -> None:
    props = spec.Basic.Properties(message_id="é" * 200)
    with pytest.raises(ValueError, match="255"):
        publish_frames(1, 100, "", "k", False, props, b"")


def test_the_channel_internals_the_fast_publish_uses_are_still_there() -> None:
    """``send_publish`` registers a publish as ``basic_publish`` does; an aiormq release
    that renames these must fail here, not silently mismatch confirms."""
    source = inspect.getsource(aiormq.Channel.basic_publish)
    for name in (
        "self.delivery_tag += 1",
        "self.confirmations[delivery_tag]",
        "self.message_id_delivery_tag[message_id]",
        "self.write_queue.put",
        "async with self.lock",
        "self._split_body(body)",
    ):
        assert name in source, name
    assert "self.max_content_size" in inspect.getsource(aiormq.Channel._split_body)
    assert "self.__lock" in inspect.getsource(aiormq.Channel)
    assert isinstance(asyncio.Queue(maxsize=10)._maxsize, int)  # type: ignore[attr-defined]
    assert WRITE_QUEUE_FRAMES > aiormq.Connection.FRAME_BUFFER_SIZE
