"""Traces end to end on real services: a proposal's W3C ``traceparent``/``tracestate`` come
back on its outcome, on its events and on a followed WAIT's final outcome, and its trace id is
in the worker's JSON log line about it; with OpenTelemetry's SDK the worker's span for the
proposal is a child of the executor's, with its phases as children."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.logs import configure_logging
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_parked_waits import scheduled_soon
from tests.integration.test_worker_roundtrip import OutcomeTap, proposal_body, publish_raw

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TRACESTATE = "vendor=abc,other=1"


@pytest.fixture
def plain_settings(services: Services, database_url: str) -> Settings:
    """No spans: the worker carries the headers as received."""
    return isolated_settings(
        services, database_url, tracing=False, tag_concurrency_slot_wait_s=1, parked_poll_s=0.2
    )


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The worker's log as ARBITER_LOG_FORMAT=json writes it, at DEBUG, into a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def lines_about(stream: io.StringIO, proposal_id: uuid.UUID) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in parsed if line.get("proposal_id") == str(proposal_id)]


async def test_the_outcome_and_the_json_log_line_carry_the_proposals_trace(
    plain_settings: Settings, json_log: io.StringIO
) -> None:
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    async with (
        running_worker(plain_settings),
        ArbiterClient.connect(settings=plain_settings) as client,
        OutcomeTap(plain_settings, "#", exchange=plain_settings.events_exchange) as events,
    ):
        future = await client.publish(
            "flow_run",
            run_id,
            ProposedState(type=StateType.PENDING),
            run=FlowRunSpec(name="traced"),
            proposal_id=proposal_id,
            traceparent=TRACEPARENT,
            tracestate=TRACESTATE,
        )
        outcome = await asyncio.wait_for(future, 15)
        event = await events.next()
    assert outcome.status is OutcomeStatus.ACCEPT
    assert event.headers["traceparent"] == TRACEPARENT
    assert event.headers["tracestate"] == TRACESTATE
    about = lines_about(json_log, proposal_id)
    assert about
    assert all(line["trace_id"] == TRACE_ID for line in about)
    [decision] = [line for line in about if line["logger"] == "arbiter.worker.consumer"]
    assert decision["trace_id"] == TRACE_ID
    assert decision["run_id"] == str(run_id)
    assert decision["run_kind"] == "flow_run"
    assert decision["status"] == "ACCEPT"
    assert isinstance(decision["rules"], list)
    assert decision["level"] == "DEBUG"
    assert "ACCEPT -> PENDING" in decision["message"]


async def test_an_outcome_has_the_trace_headers_the_proposal_came_with(
    plain_settings: Settings,
) -> None:
    proposal_id = uuid.uuid4()
    document = proposal_body(uuid.uuid4(), StateType.PENDING, proposal_id=proposal_id)
    document["run"] = {"name": "raw"}
    async with (
        running_worker(plain_settings),
        OutcomeTap(plain_settings, "outcome.flow_run.#") as outcomes,
    ):
        await publish_raw(
            plain_settings,
            json.dumps(document).encode(),
            headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
        )
        answer = await outcomes.next()
    assert json.loads(answer.body)["proposal_id"] == str(proposal_id)
    assert answer.headers["traceparent"] == TRACEPARENT
    assert answer.headers["tracestate"] == TRACESTATE


async def test_a_malformed_traceparent_is_ignored_and_the_proposal_answered(
    plain_settings: Settings, json_log: io.StringIO
) -> None:
    proposal_id = uuid.uuid4()
    document = proposal_body(uuid.uuid4(), StateType.PENDING, proposal_id=proposal_id)
    document["run"] = {"name": "raw"}
    async with (
        running_worker(plain_settings),
        OutcomeTap(plain_settings, "outcome.flow_run.#") as outcomes,
    ):
        await publish_raw(
            plain_settings, json.dumps(document).encode(), headers={"traceparent": "00-xyz-01"}
        )
        answer = await outcomes.next()
    assert json.loads(answer.body)["status"] == "ACCEPT"
    assert "traceparent" not in (answer.headers or {})
    assert all("trace_id" not in line for line in lines_about(json_log, proposal_id))


async def test_a_followed_wait_answers_finally_with_the_proposals_trace(
    plain_settings: Settings,
) -> None:
    async with running_worker(plain_settings), ArbiterClient.connect(settings=plain_settings) as c:
        run_id = await scheduled_soon(c, 1.0)
        async with OutcomeTap(plain_settings, "#") as tap:
            future = await c.publish(
                "flow_run",
                run_id,
                ProposedState(type=StateType.RUNNING),
                follow_waits=True,
                max_wait_s=30,
                traceparent=TRACEPARENT,
            )
            final = await asyncio.wait_for(future, 30)
            answer = await tap.next()
    assert final.status is OutcomeStatus.ACCEPT
    assert json.loads(answer.body)["status"] == "ACCEPT"
    assert answer.headers["traceparent"] == TRACEPARENT


# -- with OpenTelemetry's SDK -------------------------------------------------------------------


class Switch(Sampler):
    """Samples only while a test wants spans: the global provider outlives the test, and the
    workers of later tests in this process must not record into it."""

    on = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if Switch.on else Decision.DROP)

    def get_description(self) -> str:
        return "Switch"


_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=Switch())
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    Switch.on = True
    try:
        yield _EXPORTER
    finally:
        Switch.on = False
        _EXPORTER.clear()


@pytest.fixture
async def traced(services: Services, database_url: str) -> AsyncIterator[Settings]:
    settings = isolated_settings(services, database_url, tracing=True)
    async with running_worker(settings):
        yield settings


async def test_the_workers_span_is_a_child_of_the_executors_with_its_phases(
    spans: InMemorySpanExporter, traced: Settings
) -> None:
    tracer = trace.get_tracer("executor")
    async with ArbiterClient.connect(settings=traced) as client:
        with tracer.start_as_current_span("executor step") as step:
            outcome = await client.propose(
                "flow_run", uuid.uuid4(), ProposedState(type=StateType.PENDING), run=FlowRunSpec()
            )
    assert outcome.status is OutcomeStatus.ACCEPT
    by_name = await finished(spans, {"arbiter proposal", "decode", "transaction", "publish"})
    trace_id = step.get_span_context().trace_id
    assert {span.context.trace_id for span in by_name.values()} == {trace_id}
    propose = by_name["arbiter propose"]
    assert parent_of(propose) == step.get_span_context().span_id
    worker = by_name["arbiter proposal"]
    assert parent_of(worker) == propose.context.span_id
    for phase in ("decode", "transaction", "publish"):
        assert parent_of(by_name[phase]) == worker.context.span_id, phase
    assert worker.attributes is not None
    assert worker.attributes["arbiter.status"] == "ACCEPT"
    assert worker.attributes["arbiter.proposal_id"] == propose.attributes["arbiter.proposal_id"]  # type: ignore[index]


async def finished(spans: InMemorySpanExporter, wanted: set[str]) -> dict[str, ReadableSpan]:
    """The finished spans by name, once the worker's are all in (they end after the ack)."""
    for _ in range(100):
        by_name = {span.name: span for span in spans.get_finished_spans()}
        if wanted | {"arbiter propose"} <= by_name.keys():
            return by_name
        await asyncio.sleep(0.05)
    raise AssertionError(f"spans: {sorted(s.name for s in spans.get_finished_spans())}")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None
