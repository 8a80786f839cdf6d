"""PgStore's deferred writes against a real PostgreSQL: a transition's state, run and record
travel in one statement, reads in between still see them, and nothing is sent on an
exception."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from rules.errors import StoreError
from schemas import FlowRun, State, StateType, TaskRun
from tests.factories import make_state
from worker.db.store import PgStore

pytestmark = pytest.mark.integration


@dataclass
class CountingStore:
    """A store in a rolled-back transaction, counting the statements it sends."""

    store: PgStore
    statements: list[str]


@pytest.fixture
async def counting(pg_engine: AsyncEngine) -> AsyncIterator[CountingStore]:
    async with pg_engine.connect() as connection:
        transaction = await connection.begin()
        sent: list[str] = []

        def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
            sent.append(statement)

        sa.event.listen(connection.sync_connection, "before_cursor_execute", count)
        try:
            yield CountingStore(PgStore(connection), sent)
        finally:
            sa.event.remove(connection.sync_connection, "before_cursor_execute", count)
            await transaction.rollback()


class TestDeferredWrites:
    """Inside ``deferred_writes`` a transition's writes travel together; reads still see
    them, and nothing is lost or sent on an exception."""

    async def new_run(self, store: PgStore) -> FlowRun:
        run = FlowRun(id=uuid.uuid4(), name="deferred")
        await store.create_run("flow_run", run)
        return run

    def advance(self, run: FlowRun, name: str) -> State:
        state = make_state(StateType.RUNNING, name=name, data={"n": [1, 2]})
        run.state = state
        run.run_count += 1
        return state

    async def test_state_run_and_record_are_one_statement(self, counting: CountingStore) -> None:
        """insert_state + save_run + record_processed: one statement writes all three."""
        store, run = counting.store, await self.new_run(counting.store)
        proposal_id = uuid.uuid4()
        counting.statements.clear()
        async with store.deferred_writes():
            state = self.advance(run, "Running")
            await store.insert_state("flow_run", run, state)
            await store.save_run("flow_run", run)
            await store.record_processed(
                proposal_id, "ef" * 32, "flow_run", run.id, "ACCEPT", '{"ok": 1}', "[]"
            )
        assert len(counting.statements) == 1
        saved = await store.read_flow_run(run.id)
        assert saved is not None
        assert saved.run_count == 1
        assert saved.state == state
        assert await store.read_history("flow_run", run.id) == [state]
        found = await store.find_processed(proposal_id)
        assert found is not None
        assert json.loads(found.outcome_json) == {"ok": 1}

    async def test_run_and_record_without_a_state_are_one_statement(
        self, counting: CountingStore
    ) -> None:
        """A transition that wrote no state (WAIT, ABORT) saves the run with the record."""
        store, run = counting.store, await self.new_run(counting.store)
        counting.statements.clear()
        async with store.deferred_writes():
            run.name = "renamed"
            await store.save_run("flow_run", run)
            await store.record_processed(uuid.uuid4(), "ef" * 32, "flow_run", run.id, "WAIT", "{}")
        assert len(counting.statements) == 1
        saved = await store.read_flow_run(run.id)
        assert saved is not None
        assert saved.name == "renamed"

    async def test_a_read_between_writes_sees_the_deferred_state(
        self, counting: CountingStore
    ) -> None:
        """Any statement first sends what waits: a read in the middle sees the new state."""
        store, run = counting.store, await self.new_run(counting.store)
        async with store.deferred_writes():
            state = self.advance(run, "Running")
            await store.insert_state("flow_run", run, state)
            assert await store.flow_state_timestamp_taken(run.id, state.timestamp)
            await store.save_run("flow_run", run)
        assert await store.read_history("flow_run", run.id) == [state]

    async def test_leaving_the_block_sends_what_waits(self, counting: CountingStore) -> None:
        """No record at the end: the state and the run still get written, in one statement."""
        store, run = counting.store, await self.new_run(counting.store)
        counting.statements.clear()
        async with store.deferred_writes():
            state = self.advance(run, "Running")
            await store.insert_state("flow_run", run, state)
            await store.save_run("flow_run", run)
            assert counting.statements == []
        assert len(counting.statements) == 1
        saved = await store.read_flow_run(run.id)
        assert saved is not None
        assert saved.state == state

    async def test_an_exception_sends_nothing_more(self, counting: CountingStore) -> None:
        """The caller's transaction is rolling back: waiting writes are dropped, not sent."""
        store, run = counting.store, await self.new_run(counting.store)
        counting.statements.clear()

        async def failing_transition() -> None:
            async with store.deferred_writes():
                await store.insert_state("flow_run", run, self.advance(run, "Running"))
                raise RuntimeError("rule failed")

        with pytest.raises(RuntimeError, match="rule failed"):
            await failing_transition()
        assert counting.statements == []
        assert await store.read_history("flow_run", run.id) == []

    async def test_writes_of_two_runs_are_sent_in_order(self, counting: CountingStore) -> None:
        """A second run's state (a subflow's parent task) first sends the first run's."""
        store = counting.store
        flow = await self.new_run(store)
        task = TaskRun(id=uuid.uuid4(), task_key="parent")
        await store.create_run("task_run", task)
        async with store.deferred_writes():
            flow_state = self.advance(flow, "Running")
            await store.insert_state("flow_run", flow, flow_state)
            task_state = make_state(StateType.RUNNING)
            task.state = task_state
            await store.insert_state("task_run", task, task_state)
            await store.save_run("task_run", task)
            await store.save_run("flow_run", flow)
        assert await store.read_history("flow_run", flow.id) == [flow_state]
        assert await store.read_history("task_run", task.id) == [task_state]
        saved_task = await store.read_task_run(task.id)
        assert saved_task is not None
        assert saved_task.state == task_state

    async def test_saving_a_missing_run_is_still_a_permanent_error(
        self, counting: CountingStore
    ) -> None:
        """Deferred or not, and recorded with it or not, a run that does not exist is refused."""
        store = counting.store
        ghost = FlowRun(id=uuid.uuid4())
        with pytest.raises(StoreError, match="to save") as leaving:
            async with store.deferred_writes():
                await store.save_run("flow_run", ghost)
        assert not leaving.value.retryable

        async def save_and_record() -> None:
            async with store.deferred_writes():
                await store.save_run("flow_run", ghost)
                await store.record_processed(
                    uuid.uuid4(), "ef" * 32, "flow_run", ghost.id, "WAIT", "{}"
                )

        with pytest.raises(StoreError, match="to save") as recording:
            await save_and_record()
        assert not recording.value.retryable

    async def test_a_duplicate_record_is_still_retryable(self, counting: CountingStore) -> None:
        """The combined statement keeps record_processed's answer to a concurrent twin."""
        store, run = counting.store, await self.new_run(counting.store)
        proposal_id = uuid.uuid4()
        await store.record_processed(proposal_id, "ef" * 32, "flow_run", run.id, "WAIT", "{}")

        async def record_again() -> None:
            async with store.deferred_writes():
                await store.save_run("flow_run", run)
                await store.record_processed(
                    proposal_id, "ef" * 32, "flow_run", run.id, "WAIT", "{}"
                )

        with pytest.raises(StoreError, match="concurrently") as caught:
            await record_again()
        assert caught.value.retryable
