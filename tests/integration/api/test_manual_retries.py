"""Manually retrying a failed flow run: Prefect's ``TestManuallyRetryingFlowRuns``."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import FlowRunPolicy, FlowRunSpec, OutcomeStatus, StateType
from arbiter.worker.client import ArbiterClient
from tests.integration.api.helpers import accepted, proposed, running_flow_run, show_run

pytestmark = pytest.mark.integration


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
