"""The rules on PostgreSQL: the rule-test factory and a validation work on PgStore, and state
details of every field type survive a round trip."""

from __future__ import annotations

import uuid

import pytest

from arbiter.rules.store import AdminStore
from arbiter.schemas import State, StateDetails, StateType
from arbiter.worker.db.store import PgStore
from tests.factories import create_task_run, initialize_orchestration
from tests.integration.pg_helpers import NOW

pytestmark = pytest.mark.integration


def as_admin_store(store: PgStore) -> AdminStore:
    """mypy checks here that PgStore satisfies the AdminStore Protocol."""
    return store


class TestOrchestration:
    async def test_initialize_orchestration_on_postgres(self, pg_store: PgStore) -> None:
        """The rule-test factory works on PgStore: forced initial states, then a validation."""
        ctx = await initialize_orchestration(
            as_admin_store(pg_store),
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            initial_flow_run_state_type=StateType.RUNNING,
        )
        await ctx.validate_proposed_state()

        assert ctx.validated_state is not None
        assert ctx.validated_state.type is StateType.COMPLETED
        history = await pg_store.read_history("task_run", ctx.run.id)
        assert [s.type for s in history] == [StateType.RUNNING, StateType.COMPLETED]
        assert ctx.run.flow_run_id is not None
        flow_run = await pg_store.read_flow_run(ctx.run.flow_run_id)
        assert flow_run is not None
        assert flow_run.state is not None
        assert flow_run.state.type is StateType.RUNNING
        assert flow_run.state_type is StateType.RUNNING
        task_run = await pg_store.read_task_run(ctx.run.id)
        assert task_run is not None
        assert task_run.state is not None
        assert task_run.state.type is StateType.RUNNING  # saved by the forced transition
        assert task_run.state == history[0]

    async def test_details_with_every_field_type(self, pg_store: PgStore) -> None:
        """StateDetails built field by field survive a round trip (UUIDs, datetimes, dicts)."""
        run = await create_task_run(pg_store, flow_run_id=None)
        state = State(
            type=StateType.SCHEDULED,
            timestamp=NOW,
            state_details=StateDetails(
                task_run_id=run.id,
                child_flow_run_id=uuid.uuid4(),
                pause_timeout=NOW,
                deferred=None,
                untrackable_result=True,
                refresh_cache=True,
                traceparent="00-abc",
                deployment_concurrency_lease_id=uuid.uuid4(),
            ),
        )
        await pg_store.insert_state("task_run", run, state)
        assert await pg_store.read_history("task_run", run.id) == [state]
