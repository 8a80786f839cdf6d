"""Prefect's API-level orchestration scenarios (reference §5.8), through one real worker.

Prefect runs these through its HTTP ``set_state`` and ``resume`` endpoints; here each
one is a sequence of proposals to a worker on real RabbitMQ and PostgreSQL, checked
on the outcome and on the run's stored history (what ``arbiter runs show`` prints).
Arbiter has no resume endpoint, so a resume is the proposal that Prefect's endpoint
makes: RUNNING for a blocking pause, SCHEDULED "Resuming" for a suspension. Prefect
fixtures that create a run already in some state become proposals that drive the run
there, forced only where the core policy forbids the way there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import (
    ErrorCode,
    FlowRun,
    FlowRunPolicy,
    FlowRunSpec,
    Outcome,
    OutcomeStatus,
    ProposedState,
    RunKind,
    State,
    StateDetails,
    StateType,
    TaskRun,
    TaskRunPolicy,
    TaskRunSpec,
)
from tests.fixtures.services import isolated_settings, running_worker
from worker.client import ArbiterClient
from worker.db.store import PgStore
from worker.devservices import Services
from worker.settings import Settings

pytestmark = pytest.mark.integration

PERSISTED_RESULT: dict[str, JsonValue] = {
    "storage_key": "/results/abc",
    "serializer": {"type": "pickle"},
}
DATA_LOSS_REASON = (
    "Cannot overwrite a COMPLETED state that carries persisted result data with one that does not."
)


# One worker and one client for the whole module: every test uses its own run ids.


@pytest.fixture(scope="module")
def settings(services: Services, database_url: str) -> Settings:
    return isolated_settings(services, database_url)


@pytest.fixture(scope="module")
async def worker(settings: Settings) -> AsyncIterator[asyncio.Event]:
    async with running_worker(settings) as stop:
        yield stop


@pytest.fixture(scope="module")
async def client(settings: Settings, worker: asyncio.Event) -> AsyncIterator[ArbiterClient]:
    async with ArbiterClient.connect(settings=settings) as connected:
        yield connected


def proposed(
    state_type: StateType,
    name: str | None = None,
    *,
    data: JsonValue = None,
    **details: object,
) -> ProposedState:
    return ProposedState(
        type=state_type,
        name=name,
        data=data,
        state_details=StateDetails.model_validate(details),
    )


def in_days(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


async def show_run(
    engine: AsyncEngine, kind: RunKind, run_id: uuid.UUID
) -> tuple[FlowRun | TaskRun | None, list[State]]:
    """The run and its history, oldest first: what ``arbiter runs show`` reads."""
    async with engine.connect() as conn:
        store = PgStore(conn)
        run = (
            await store.read_flow_run(run_id)
            if kind == "flow_run"
            else await store.read_task_run(run_id)
        )
        return run, await store.read_history(kind, run_id)


async def history(engine: AsyncEngine, kind: RunKind, run_id: uuid.UUID) -> list[tuple[str, str]]:
    """The run's states as (type, name), oldest first."""
    _, states = await show_run(engine, kind, run_id)
    return [(s.type.value, s.name) for s in states]


def accepted(outcome: Outcome) -> State:
    assert outcome.status is OutcomeStatus.ACCEPT, (outcome.status, outcome.details)
    assert outcome.state is not None
    return outcome.state


async def running_flow_run(client: ArbiterClient, spec: FlowRunSpec | None = None) -> uuid.UUID:
    """A new flow run, RUNNING (its first attempt, run_count 1)."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.RUNNING), run=spec or FlowRunSpec()
    )
    accepted(outcome)
    return run_id


# TestSetFlowRunState


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


# TestPreventResultDataLossAPI: every proposal is forced (MinimalFlowPolicy).


async def completed_flow_run(client: ArbiterClient, data: JsonValue) -> tuple[uuid.UUID, State]:
    run_id = uuid.uuid4()
    state = accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.COMPLETED, data=data),
            run=FlowRunSpec(),
            force=True,
        )
    )
    return run_id, state


async def test_forced_bare_completed_cannot_overwrite_a_persisted_result(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A forced COMPLETED without data is null-rejected; the persisted result is kept.

    Mirrors ``TestPreventResultDataLossAPI``: persisted result, then a bare COMPLETED."""
    run_id, current = await completed_flow_run(client, PERSISTED_RESULT)

    outcome = await client.propose("flow_run", run_id, proposed(StateType.COMPLETED), force=True)

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.details.reason == DATA_LOSS_REASON
    assert outcome.state is not None
    assert (outcome.state.id, outcome.state.data) == (current.id, PERSISTED_RESULT)
    _, states = await show_run(pg_engine, "flow_run", run_id)
    assert [s.data for s in states] == [PERSISTED_RESULT]


async def test_forced_completed_may_replace_a_persisted_result_with_another(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A forced COMPLETED carrying a new persisted result is accepted.

    Mirrors ``TestPreventResultDataLossAPI``: persisted result, then new persisted data."""
    run_id, _ = await completed_flow_run(client, PERSISTED_RESULT)
    new_result: dict[str, JsonValue] = {**PERSISTED_RESULT, "storage_key": "/results/def"}

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.COMPLETED, data=new_result), force=True
    )

    assert accepted(outcome).data == new_result
    _, states = await show_run(pg_engine, "flow_run", run_id)
    assert [s.data for s in states] == [PERSISTED_RESULT, new_result]


async def test_forced_bare_completed_may_replace_scalar_data(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Inline scalar data is not a persisted result: a forced bare COMPLETED is accepted.

    Mirrors ``TestPreventResultDataLossAPI``: current data 1, then a bare COMPLETED."""
    run_id, _ = await completed_flow_run(client, 1)

    outcome = await client.propose("flow_run", run_id, proposed(StateType.COMPLETED), force=True)

    assert accepted(outcome).data is None
    _, states = await show_run(pg_engine, "flow_run", run_id)
    assert [s.data for s in states] == [1, None]


async def test_forced_scalar_data_cannot_overwrite_a_persisted_result(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Inline data does not replace a persisted result: null reject, the result is kept.

    Mirrors ``TestPreventResultDataLossAPI``: persisted result, then scalar data."""
    run_id, current = await completed_flow_run(client, PERSISTED_RESULT)

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.COMPLETED, data=1), force=True
    )

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.details.reason == DATA_LOSS_REASON
    assert outcome.state is not None
    assert outcome.state.id == current.id
    _, states = await show_run(pg_engine, "flow_run", run_id)
    assert [s.data for s in states] == [PERSISTED_RESULT]


async def test_forced_bare_completed_may_replace_list_data(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Inline list data is not a persisted result: a forced bare COMPLETED is accepted.

    Mirrors ``TestPreventResultDataLossAPI``: current list data, then a bare COMPLETED."""
    run_id, _ = await completed_flow_run(client, [1, 2, 3])

    outcome = await client.propose("flow_run", run_id, proposed(StateType.COMPLETED), force=True)

    assert accepted(outcome).data is None
    _, states = await show_run(pg_engine, "flow_run", run_id)
    assert [s.data for s in states] == [[1, 2, 3], None]


# TestManuallyRetryingFlowRuns


async def failed_flow_run(client: ArbiterClient, spec: FlowRunSpec) -> uuid.UUID:
    """A flow run that ran once and failed for good (no retries left)."""
    run_id = await running_flow_run(client, spec)
    accepted(await client.propose("flow_run", run_id, proposed(StateType.FAILED)))
    return run_id


async def test_a_manual_flow_run_retry_keeps_the_run_count(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """FAILED → SCHEDULED "AwaitingRetry" with a deployment is accepted; run_count stays 1.

    Mirrors ``TestManuallyRetryingFlowRuns::test_manual_flow_run_retries``."""
    run_id = await failed_flow_run(client, FlowRunSpec(deployment_id=uuid.uuid4()))

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.SCHEDULED, "AwaitingRetry")
    )

    state = accepted(outcome)
    assert (state.type, state.name) == (StateType.SCHEDULED, "AwaitingRetry")
    assert outcome.run is not None
    assert outcome.run.run_count == 1
    run, _ = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert (run.state_type, run.run_count) == (StateType.SCHEDULED, 1)


async def test_a_manual_flow_run_retry_succeeds_beyond_the_retries_setting(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """After three attempts with retries=2, a manual retry is still accepted; run_count stays 3.

    Mirrors ``TestManuallyRetryingFlowRuns::test_manual_flow_run_retries_succeed_even_if_
    exceeding_retries_setting``; the two automatic retries happen through the worker."""
    spec = FlowRunSpec(deployment_id=uuid.uuid4(), empirical_policy=FlowRunPolicy(retries=2))
    run_id = await running_flow_run(client, spec)
    for _ in range(2):
        retry = await client.propose("flow_run", run_id, proposed(StateType.FAILED))
        assert retry.status is OutcomeStatus.REJECT
        assert retry.state is not None
        assert retry.state.name == "AwaitingRetry"
        accepted(await client.propose("flow_run", run_id, proposed(StateType.RUNNING)))
    failed = accepted(await client.propose("flow_run", run_id, proposed(StateType.FAILED)))
    assert failed.type is StateType.FAILED

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.SCHEDULED, "AwaitingRetry")
    )

    assert accepted(outcome).type is StateType.SCHEDULED
    run, _ = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert (run.state_type, run.run_count) == (StateType.SCHEDULED, 3)


async def test_a_manual_flow_run_retry_may_use_any_state_name(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """FAILED → SCHEDULED "FooBar" is a manual retry too.

    Mirrors ``TestManuallyRetryingFlowRuns::test_manual_flow_run_retries_allow_arbitrary_
    state_name``."""
    run_id = await failed_flow_run(client, FlowRunSpec(deployment_id=uuid.uuid4()))

    outcome = await client.propose("flow_run", run_id, proposed(StateType.SCHEDULED, "FooBar"))

    state = accepted(outcome)
    assert (state.type, state.name) == (StateType.SCHEDULED, "FooBar")
    run, _ = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert run.state_type is StateType.SCHEDULED


async def test_a_flow_run_without_a_deployment_cannot_be_manually_retried(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Nothing could pick up a rescheduled ad-hoc run: aborted, it stays FAILED with run_count 1.

    Mirrors ``TestManuallyRetryingFlowRuns::test_cannot_restart_flow_run_without_deployment``."""
    run_id = await failed_flow_run(client, FlowRunSpec())

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.SCHEDULED, "AwaitingRetry")
    )

    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == "Cannot reschedule a run without an associated deployment."
    run, _ = await show_run(pg_engine, "flow_run", run_id)
    assert run is not None
    assert (run.state_type, run.run_count) == (StateType.FAILED, 1)


# TestResumeFlowrun: the proposals Prefect's resume endpoint makes.


async def test_resuming_a_blocking_pause_runs_the_flow_again(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A blocking pause (pause_reschedule False) resumes into RUNNING, no deployment needed.

    Mirrors ``TestResumeFlowrun::test_resuming_blocking_pauses`` (its resume proposes RUNNING);
    rule level: ``TestResumingFlows::test_can_leave_blocking_pausing_state_without_a_deployment``.
    """
    run_id = await running_flow_run(client)
    accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.PAUSED, pause_timeout=in_days(1), pause_reschedule=False),
        )
    )

    outcome = await client.propose("flow_run", run_id, proposed(StateType.RUNNING))

    assert accepted(outcome).type is StateType.RUNNING
    assert await history(pg_engine, "flow_run", run_id) == [
        ("RUNNING", "Running"),
        ("PAUSED", "Paused"),
        ("RUNNING", "Running"),
    ]


async def test_resuming_a_suspended_flow_run_reschedules_it(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """A suspension (pause_reschedule True) of a deployed run resumes into SCHEDULED "Resuming".

    Mirrors ``TestResumeFlowrun::test_resuming_nonblocking_pauses``; rule level:
    ``TestResumingFlows::test_allows_leaving_pausing_state``."""
    run_id = await running_flow_run(client, FlowRunSpec(deployment_id=uuid.uuid4()))
    accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(
                StateType.PAUSED, "Suspended", pause_timeout=in_days(1), pause_reschedule=True
            ),
        )
    )

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.SCHEDULED, "Resuming", scheduled_time=in_days(0))
    )

    state = accepted(outcome)
    assert (state.type, state.name) == (StateType.SCHEDULED, "Resuming")
    assert await history(pg_engine, "flow_run", run_id) == [
        ("RUNNING", "Running"),
        ("PAUSED", "Suspended"),
        ("SCHEDULED", "Resuming"),
    ]


async def test_a_suspended_flow_run_without_a_deployment_cannot_be_resumed(
    client: ArbiterClient, pg_engine: AsyncEngine
) -> None:
    """Without a deployment nothing can reschedule a suspension: null reject, it stays PAUSED.

    Mirrors ``TestResumeFlowrun::test_cannot_resume_nonblocking_pauses_without_deployment``;
    rule level: ``TestResumingFlows::test_suspended_resume_without_deployment_names_the_
    proposed_state``. The core policy refuses to suspend such a run, so, like Prefect's
    fixture, the PAUSED state is forced."""
    run_id = await running_flow_run(client)
    paused = accepted(
        await client.propose(
            "flow_run",
            run_id,
            proposed(StateType.PAUSED, pause_timeout=in_days(1), pause_reschedule=True),
            force=True,
        )
    )

    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.SCHEDULED, "Resuming", scheduled_time=in_days(0))
    )

    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.details.reason == "Cannot reschedule a resuming flow run without a deployment."
    assert outcome.state is not None
    assert outcome.state.id == paused.id
    assert await history(pg_engine, "flow_run", run_id) == [
        ("RUNNING", "Running"),
        ("PAUSED", "Paused"),
    ]


# TestSetTaskRunState


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
