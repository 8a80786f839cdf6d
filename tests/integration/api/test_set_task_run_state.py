"""Setting a task run's state through the worker: Prefect's ``TestSetTaskRunState``."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import ErrorCode, OutcomeStatus, StateType, TaskRun, TaskRunPolicy, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from tests.integration.api.helpers import accepted, history, proposed, running_flow_run, show_run

pytestmark = pytest.mark.integration


async def test_a_task_run_state_is_set(client: ArbiterClient, pg_engine: AsyncEngine) -> None:
    """In a RUNNING flow run, a task's RUNNING "Test State" is accepted with run_count 1.

    Mirrors ``TestSetTaskRunState::test_set_task_run_state``."""
    flow_run_id = await running_flow_run(client)
    task_run_id = uuid.uuid4()

    outcome = await client.propose(
        "task_run",
        task_run_id,
        proposed(StateType.RUNNING, "Test State"),
        run=TaskRunSpec(flow_run_id=flow_run_id, task_key="k"),
    )

    state = accepted(outcome)
    assert (state.type, state.name) == (StateType.RUNNING, "Test State")
    run, _ = await show_run(pg_engine, "task_run", task_run_id)
    assert isinstance(run, TaskRun)
    assert (run.state_type, run.state_name, run.run_count) == (StateType.RUNNING, "Test State", 1)
    assert run.flow_run_id == flow_run_id


async def test_an_autonomous_task_run_state_is_set(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A task run without a flow run runs freely: RUNNING accepted, run_count 1.

    Mirrors ``TestSetTaskRunState::test_set_task_run_state_without_flow_run_id``."""
    task_run_id = uuid.uuid4()

    outcome = await client.propose(
        "task_run",
        task_run_id,
        proposed(StateType.RUNNING, "Test State"),
        run=TaskRunSpec(name="my-cool-task-run-name", task_key="my-task-key", dynamic_key="0"),
    )

    assert accepted(outcome).name == "Test State"
    run, _ = await show_run(pg_engine, "task_run", task_run_id)
    assert isinstance(run, TaskRun)
    assert (run.state_type, run.state_name, run.run_count) == (StateType.RUNNING, "Test State", 1)
    assert run.flow_run_id is None


@pytest.mark.parametrize("state_type", [StateType.PENDING, StateType.RUNNING], ids=str)
async def test_setting_a_task_run_state_twice_is_accepted(
    client: ArbiterClient, pg_engine: AsyncEngine, state_type: StateType
) -> None:
    """A task restarted behind the server's back may propose its current state again.

    Mirrors ``TestSetTaskRunState::test_setting_task_run_state_twice_works``."""
    flow_run_id = await running_flow_run(client)
    task_run_id = uuid.uuid4()
    spec = TaskRunSpec(flow_run_id=flow_run_id, task_key="k")
    accepted(
        await client.propose("task_run", task_run_id, proposed(state_type, "Test State"), run=spec)
    )

    outcome = await client.propose("task_run", task_run_id, proposed(state_type, "Test State"))

    assert accepted(outcome).type is state_type
    assert len(await history(pg_engine, "task_run", task_run_id)) == 2


async def running_task_run(client: ArbiterClient, retries: int) -> uuid.UUID:
    """A task run RUNNING (its first attempt) inside a RUNNING flow run."""
    flow_run_id = await running_flow_run(client)
    task_run_id = uuid.uuid4()
    spec = TaskRunSpec(
        flow_run_id=flow_run_id, task_key="k", empirical_policy=TaskRunPolicy(retries=retries)
    )
    accepted(await client.propose("task_run", task_run_id, proposed(StateType.RUNNING), run=spec))
    return task_run_id


async def test_a_failed_task_run_with_retries_left_awaits_retry(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """FAILED with a retry left is rejected into SCHEDULED "AwaitingRetry", which is written.

    Mirrors ``TestSetTaskRunState::test_failed_becomes_awaiting_retry``."""
    task_run_id = await running_task_run(client, retries=1)

    outcome = await client.propose("task_run", task_run_id, proposed(StateType.FAILED))

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.state is not None
    assert (outcome.state.type, outcome.state.name) == (StateType.SCHEDULED, "AwaitingRetry")
    assert await history(pg_engine, "task_run", task_run_id) == [
        ("RUNNING", "Running"),
        ("SCHEDULED", "AwaitingRetry"),
    ]


async def test_force_skips_task_run_orchestration(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """The same FAILED, forced, is accepted: no retry is scheduled.

    Mirrors ``TestSetTaskRunState::test_set_task_run_state_force_skips_orchestration``."""
    task_run_id = await running_task_run(client, retries=1)

    outcome = await client.propose("task_run", task_run_id, proposed(StateType.FAILED), force=True)

    assert accepted(outcome).type is StateType.FAILED
    assert await history(pg_engine, "task_run", task_run_id) == [
        ("RUNNING", "Running"),
        ("FAILED", "Failed"),
    ]


@pytest.mark.parametrize(
    "first_type",
    [StateType.PENDING, StateType.RUNNING, StateType.CANCELLED, StateType.CANCELLING],
    ids=str,
)
async def test_an_autonomous_deferred_task_run_cannot_reenter_pending(
    client: ArbiterClient, pg_engine: AsyncEngine, first_type: StateType
) -> None:
    """A deferred task run cannot go back to PENDING from PENDING, RUNNING, CANCELLED or
    CANCELLING: the background policy aborts it.

    Mirrors ``TestSetTaskRunState::test_autonomous_task_run_aborts_if_enters_pending_from_
    disallowed_state``."""
    task_run_id = uuid.uuid4()
    spec = TaskRunSpec(task_key="my-task-key", dynamic_key="0")
    accepted(
        await client.propose("task_run", task_run_id, proposed(first_type, deferred=True), run=spec)
    )

    outcome = await client.propose(
        "task_run", task_run_id, proposed(StateType.PENDING, deferred=True)
    )

    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == (
        f"This run is in a {first_type.name} state and cannot transition to a PENDING state."
    )
    assert [t for t, _ in await history(pg_engine, "task_run", task_run_id)] == [first_type.value]


async def test_an_over_long_cache_key_rejects_the_transition(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """COMPLETED with a 5000-character cache key: REJECT, but the COMPLETED state is written.

    Mirrors ``TestSetTaskRunState::test_set_task_run_state_with_long_cache_key_rejects_
    transition``; the reject reuses the proposed state (reference §6.6)."""
    flow_run_id = await running_flow_run(client)
    task_run_id = uuid.uuid4()

    outcome = await client.propose(
        "task_run",
        task_run_id,
        proposed(StateType.COMPLETED, "Test State", cache_key="a" * 5000),
        run=TaskRunSpec(flow_run_id=flow_run_id, task_key="k"),
    )

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.details.reason == "Cache key exceeded maximum allowed length of 2000 characters."
    assert outcome.state is not None
    assert (outcome.state.type, outcome.state.name) == (StateType.COMPLETED, "Test State")
    assert await history(pg_engine, "task_run", task_run_id) == [("COMPLETED", "Test State")]


async def test_a_task_of_a_missing_flow_run_is_refused(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """RUNNING for a new task run whose flow_run_id names no flow run is INVALID unknown_run;
    nothing is written.

    Arbiter's analogue of ``TestSetTaskRunState::test_set_task_run_state_returns_404_on_
    missing_flow_run``: in Prefect a foreign key forbids such a task run, so every call
    answers 404; here the proposal is refused before any rule runs."""
    task_run_id = uuid.uuid4()
    missing_flow_run_id = uuid.uuid4()

    outcome = await client.propose(
        "task_run",
        task_run_id,
        proposed(StateType.RUNNING, "Test State"),
        run=TaskRunSpec(flow_run_id=missing_flow_run_id, task_key="k"),
    )

    assert outcome.status is OutcomeStatus.INVALID
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.UNKNOWN_RUN
    assert outcome.error.message == (
        f"task run {task_run_id} names flow run {missing_flow_run_id}, which does not exist"
    )
    run, states = await show_run(pg_engine, "task_run", task_run_id)
    assert (run, states) == (None, [])
