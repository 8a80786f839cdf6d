"""Reading W3C trace headers, and the worker's log formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from arbiter.worker.logs import configure_logging
from arbiter.worker.tracing import (
    ProposalTrace,
    TraceContext,
    answering,
    client_span,
    inject_current,
    trace_context,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_a_valid_traceparent_and_tracestate_are_read() -> None:
    context = trace_context({"traceparent": PARENT, "tracestate": "a=1,b=2"})
    assert context == TraceContext(PARENT, "a=1,b=2")
    assert context.trace_id == TRACE_ID
    assert context.as_headers() == {"traceparent": PARENT, "tracestate": "a=1,b=2"}


def test_headers_sent_as_bytes_are_read_too() -> None:
    context = trace_context({"traceparent": PARENT.encode()})
    assert context is not None
    assert context.tracestate is None


@pytest.mark.parametrize(
    "value",
    [
        "00-xyz-01",
        PARENT.upper(),
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"{PARENT}-extra",  # version 00 has exactly four fields
        42,
        "",
    ],
)
def test_a_malformed_traceparent_is_ignored(value: object) -> None:
    assert trace_context({"traceparent": value, "tracestate": "a=1"}) is None


def test_a_later_versions_extra_fields_are_dropped_and_version_00_is_sent_on() -> None:
    context = trace_context({"traceparent": f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-next"})
    assert context is not None
    assert context.traceparent == PARENT


def test_no_headers_means_no_trace() -> None:
    assert trace_context(None) is None
    assert trace_context({"x-other": "1"}) is None


def test_a_long_tracestate_is_cut_to_what_w3c_requires_to_be_propagated() -> None:
    context = trace_context({"traceparent": PARENT, "tracestate": "k=" + "v" * 1000})
    assert context is not None
    assert context.tracestate is not None
    assert len(context.tracestate) == 512


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    json_stream, text_stream = io.StringIO(), io.StringIO()
    as_json = configure_logging("INFO", "json", json_stream)
    configure_logging("INFO", "text", text_stream)  # replaces the root's handlers
    root.addHandler(as_json)
    try:
        yield json_stream, text_stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_a_json_line_names_the_proposal_being_answered_and_its_trace(
    captured: tuple[io.StringIO, io.StringIO],
) -> None:
    json_stream, text_stream = captured
    trace = ProposalTrace(
        received=TraceContext(PARENT),
        run_kind="task_run",
        run_id="r1",
        proposal_id="p1",
        status="REJECT",
        rules=["SecureTaskConcurrencySlots"],
    )
    with answering(trace):
        logging.getLogger("arbiter.test").info("decided %s", "it")
    logging.getLogger("arbiter.test").warning("outside")
    first, second = (json.loads(line) for line in json_stream.getvalue().splitlines())
    assert first["message"] == "decided it"
    assert first["level"] == "INFO"
    assert first["logger"] == "arbiter.test"
    assert (first["run_kind"], first["run_id"], first["proposal_id"]) == ("task_run", "r1", "p1")
    assert first["trace_id"] == TRACE_ID
    assert first["status"] == "REJECT"
    assert first["rules"] == ["SecureTaskConcurrencySlots"]
    assert first["time"].endswith("+00:00")
    assert "trace_id" not in second
    assert "proposal_id" not in second
    text_first, text_second = text_stream.getvalue().splitlines()
    assert text_first.endswith(f"decided it [trace {TRACE_ID}]")
    assert text_second.endswith("outside")


def test_a_json_line_carries_the_exception(captured: tuple[io.StringIO, io.StringIO]) -> None:
    json_stream, _ = captured
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("arbiter.test").exception("failed")
    [line] = (json.loads(line) for line in json_stream.getvalue().splitlines())
    assert "RuntimeError: boom" in line["exception"]


def test_a_client_span_keeps_the_callers_trace_on_the_proposal_with_or_without_an_sdk() -> None:
    """Without an OpenTelemetry SDK no span is created (it would only copy the context),
    yet the proposal still carries the caller's current trace."""
    otel = pytest.importorskip("opentelemetry.trace")
    caller = otel.SpanContext(
        trace_id=int(TRACE_ID, 16),
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=otel.TraceFlags(1),
    )
    with otel.use_span(otel.NonRecordingSpan(caller)), client_span("arbiter propose", {}):
        headers = inject_current()
    assert headers["traceparent"].split("-")[1] == TRACE_ID
