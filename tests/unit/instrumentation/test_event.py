"""The event a flow-run state change emits: its name, time, resource and payload."""

from __future__ import annotations

import datetime as dt
import json

from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateDetails, StateType, utcnow
from tests.unit.instrumentation.helpers import (
    RUNNING_TRANSITION,
    flow_context,
    instrument,
    only_event,
    pending_to_running,
)


async def test_instrumenting_a_flow_run_state_change(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """P → R emits one "prefect.flow-run.Running" event describing the run and its flow."""
    start_of_test = utcnow()
    ctx = pending_to_running(store, flow_run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    event = only_event(ctx)
    assert ctx.proposed_state is not None
    assert event["event"] == "prefect.flow-run.Running"
    assert start_of_test <= dt.datetime.fromisoformat(event["occurred"]) <= utcnow()
    assert event["resource"] == {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name,
        "prefect.run-count": "0",
        "prefect.state-message": "",
        "prefect.state-name": "Running",
        "prefect.state-timestamp": ctx.proposed_state.timestamp.isoformat(),
        "prefect.state-type": "RUNNING",
    }
    assert event["related"] == [
        {
            "prefect.resource.id": f"prefect.flow.{flow_run.flow_name}",
            "prefect.resource.role": "flow",
            "prefect.resource.name": flow_run.flow_name,
        }
    ]


async def test_instrumenting_a_flow_run_includes_state_in_payload(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """The payload has the intended transition and the essentials of both states."""
    proposed = State(type=StateType.RUNNING, name="custom", message="foo")

    ctx = await instrument(flow_context(store, flow_run, None, proposed), (None, StateType.RUNNING))

    assert only_event(ctx)["payload"] == {
        "intended": {"from": None, "to": "RUNNING"},
        "initial_state": None,
        "validated_state": {"type": "RUNNING", "name": "custom", "message": "foo"},
    }


async def test_event_body_is_plain_json(store: InMemoryStore, flow_run: FlowRun) -> None:
    """The body survives a JSON round trip unchanged: no datetimes or UUIDs left in it."""
    ctx = flow_context(
        store,
        flow_run,
        State(type=StateType.PENDING),
        State(type=StateType.PAUSED, state_details=StateDetails(pause_reschedule=True)),
    )

    ctx = await instrument(ctx, (StateType.PENDING, StateType.PAUSED))

    event = only_event(ctx)
    assert json.loads(json.dumps(event)) == event
