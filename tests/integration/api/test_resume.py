"""Resuming a paused flow run: Prefect's ``TestResumeFlowrun``, as the proposals its
resume endpoint makes.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import FlowRunSpec, OutcomeStatus, StateType
from arbiter.worker.client import ArbiterClient
from tests.integration.api.helpers import accepted, history, in_days, proposed, running_flow_run

pytestmark = pytest.mark.integration


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
