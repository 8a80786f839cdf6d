"""Ordering: an event names the state it follows when that state is recent."""

from __future__ import annotations

import datetime as dt

from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateType, utcnow
from tests.unit.instrumentation.helpers import (
    RUNNING_TRANSITION,
    flow_context,
    instrument,
    only_event,
)


async def test_flow_run_state_change_events_capture_order_on_short_gaps(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """An event within five minutes of the previous state names it in ``follows``."""
    pending = State(type=StateType.PENDING, timestamp=utcnow() - dt.timedelta(minutes=2))
    first = await instrument(
        flow_context(store, flow_run, None, pending), (None, StateType.PENDING)
    )
    running = State(type=StateType.RUNNING)

    second = await instrument(flow_context(store, flow_run, pending, running), RUNNING_TRANSITION)

    assert only_event(first)["event"] == "prefect.flow-run.Pending"
    event = only_event(second)
    assert event["event"] == "prefect.flow-run.Running"
    assert event["id"] == str(running.id)
    assert event["follows"] == str(pending.id)


async def test_flow_run_state_change_events_do_not_capture_order_on_long_gaps(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """A predecessor older than five minutes is not chained."""
    pending = State(type=StateType.PENDING, timestamp=utcnow() - dt.timedelta(minutes=15))
    await instrument(flow_context(store, flow_run, None, pending), (None, StateType.PENDING))
    running = State(type=StateType.RUNNING)

    ctx = await instrument(flow_context(store, flow_run, pending, running), RUNNING_TRANSITION)

    event = only_event(ctx)
    assert event["id"] == str(running.id)
    assert event["follows"] is None


async def test_flow_run_state_change_events_do_not_capture_order_on_initial_transition(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """The first state of a run follows nothing."""
    pending = State(type=StateType.PENDING)

    ctx = await instrument(flow_context(store, flow_run, None, pending), (None, StateType.PENDING))

    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Pending"
    assert event["id"] == str(pending.id)
    assert event["follows"] is None
