"""A persisted result is not overwritten: Prefect's ``TestPreventResultDataLossAPI``.

Every proposal is forced (MinimalFlowPolicy).
"""

from __future__ import annotations

import uuid

import pytest
from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import FlowRunSpec, OutcomeStatus, State, StateType
from arbiter.worker.client import ArbiterClient
from tests.integration.api.helpers import accepted, proposed, show_run

pytestmark = pytest.mark.integration

PERSISTED_RESULT: dict[str, JsonValue] = {
    "storage_key": "/results/abc",
    "serializer": {"type": "pickle"},
}
DATA_LOSS_REASON = (
    "Cannot overwrite a COMPLETED state that carries persisted result data with one that does not."
)


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
