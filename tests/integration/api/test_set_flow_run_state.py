"""Setting a flow run's state through the worker: Prefect's ``TestSetFlowRunState``."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import FlowRunSpec, OutcomeStatus, StateType
from arbiter.worker.client import ArbiterClient
from tests.integration.api.helpers import accepted, history, in_days, proposed, show_run

pytestmark = pytest.mark.integration


async def test_a_flow_run_state_is_set(client: ArbiterClient, pg_engine: AsyncEngine) -> None:
    """RUNNING "Test State" on a new flow run is accepted and written.

    Mirrors ``TestSetFlowRunState::test_set_flow_run_state``."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.RUNNING, "Test State"), run=FlowRunSpec()
    )

    state = accepted(outcome)
    assert (state.type, state.name) == (StateType.RUNNING, "Test State")
    run, states = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert run.state_id == state.id
    assert run.run_count == 1
    assert [(s.type, s.name) for s in states] == [(StateType.RUNNING, "Test State")]


@pytest.mark.parametrize("first_type", [StateType.PENDING, StateType.RUNNING], ids=str)
async def test_setting_a_flow_run_state_twice_aborts(
    client: ArbiterClient, pg_engine: AsyncEngine, first_type: StateType
) -> None:
    """A second executor re-proposing PENDING is aborted and writes nothing.

    Mirrors ``TestSetFlowRunState::test_setting_flow_run_state_twice_aborts``."""
    run_id = uuid.uuid4()
    accepted(
        await client.propose(
            "flow_run", run_id, proposed(first_type, "Test State"), run=FlowRunSpec()
        )
    )

    outcome = await client.propose("flow_run", run_id, proposed(StateType.PENDING, "Test State"))

    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == (
        f"This run is in a {first_type.name} state and cannot transition to a PENDING state."
    )
    assert await history(pg_engine, "flow_run", run_id) == [(first_type.value, "Test State")]


async def test_force_skips_flow_run_orchestration(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """RUNNING before a run's scheduled time waits; the same proposal forced is accepted.

    Mirrors ``TestSetFlowRunState::test_set_flow_run_state_force_skips_orchestration``."""
    run_id = uuid.uuid4()
    accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.SCHEDULED, "Scheduled", scheduled_time=in_days(30)),
            run=FlowRunSpec(),
        )
    )

    waited = await client.propose("flow_run", run_id, proposed(StateType.RUNNING, "Running"))
    assert waited.status is OutcomeStatus.WAIT

    forced = await client.propose(
        "flow_run", run_id, proposed(StateType.RUNNING, "Running"), force=True
    )
    assert accepted(forced).type is StateType.RUNNING
    assert await history(pg_engine, "flow_run", run_id) == [
        ("SCHEDULED", "Scheduled"),
        ("RUNNING", "Running"),
    ]


@pytest.mark.parametrize("data", [1, "test", {"foo": "bar"}], ids=["int", "str", "dict"])
async def test_a_flow_run_state_accepts_any_jsonable_data(
    client: ArbiterClient, pg_engine: AsyncEngine, data: JsonValue
) -> None:
    """COMPLETED with any JSON data is accepted; the data is stored and returned as sent.

    Mirrors ``TestSetFlowRunState::test_set_flow_run_state_accepts_any_jsonable_data``."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.COMPLETED, data=data), run=FlowRunSpec()
    )

    assert accepted(outcome).data == data
    run, states = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert run.state is not None
    assert run.state.data == data
    assert [s.data for s in states] == [data]


async def test_a_flow_run_waits_until_its_scheduled_start_time(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Scheduled a day ahead, PENDING is accepted and RUNNING waits about 86400 s.

    Mirrors ``TestSetFlowRunState::test_flow_run_receives_wait_until_scheduled_start_time``."""
    run_id = uuid.uuid4()
    accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.SCHEDULED, scheduled_time=in_days(1)),
            run=FlowRunSpec(),
        )
    )
    accepted(await client.propose("flow_run", run_id, proposed(StateType.PENDING)))

    outcome = await client.propose("flow_run", run_id, proposed(StateType.RUNNING))

    assert outcome.status is OutcomeStatus.WAIT
    assert outcome.details.delay_seconds is not None
    assert 0 <= dt.timedelta(days=1).total_seconds() - outcome.details.delay_seconds <= 10
    assert await history(pg_engine, "flow_run", run_id) == [
        ("SCHEDULED", "Scheduled"),
        ("PENDING", "Pending"),
    ]


async def test_pending_to_pending_is_aborted(client: ArbiterClient, pg_engine: AsyncEngine) -> None:
    """PENDING again on a PENDING run is aborted with Prefect's reason.

    Mirrors ``TestSetFlowRunState::test_pending_to_pending``. Prefect now accepts a
    renamed PENDING (next test), so the second PENDING keeps the name "Pending"."""
    run_id = uuid.uuid4()
    accepted(
        await client.propose("flow_run", run_id, proposed(StateType.PENDING), run=FlowRunSpec())
    )

    outcome = await client.propose("flow_run", run_id, proposed(StateType.PENDING, "Pending"))

    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == (
        "This run is in a PENDING state and cannot transition to a PENDING state."
    )
    assert await history(pg_engine, "flow_run", run_id) == [("PENDING", "Pending")]


async def test_pending_to_pending_with_a_different_name_is_accepted(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Pending → Submitting is progress within PENDING, not a second claim.

    Mirrors ``TestSetFlowRunState::test_pending_to_pending_with_different_name``."""
    run_id = uuid.uuid4()
    accepted(
        await client.propose("flow_run", run_id, proposed(StateType.PENDING), run=FlowRunSpec())
    )

    outcome = await client.propose("flow_run", run_id, proposed(StateType.PENDING, "Submitting"))

    assert accepted(outcome).name == "Submitting"
    assert await history(pg_engine, "flow_run", run_id) == [
        ("PENDING", "Pending"),
        ("PENDING", "Submitting"),
    ]


async def test_pending_to_pending_with_the_same_transition_id_is_rejected(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A transition already made is null-rejected; the outcome carries the existing state.

    Mirrors ``TestSetFlowRunState::test_pending_to_pending_same_transition_id``."""
    run_id, transition_id = uuid.uuid4(), uuid.uuid4()
    existing = accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.PENDING, transition_id=transition_id),
            run=FlowRunSpec(),
        )
    )

    outcome = await client.propose(
        "flow_run",
        run_id,
        proposed(StateType.PENDING, "Test State", transition_id=transition_id),
    )

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.details.reason == "This run has already made this state transition."
    assert outcome.state is not None
    assert outcome.state.id == existing.id
    assert await history(pg_engine, "flow_run", run_id) == [("PENDING", "Pending")]
