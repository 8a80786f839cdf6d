"""PgStore's runs and states against a real PostgreSQL: every column round-trips, reads return
fresh objects, row locks hold and plain reads do not wait for them, history keeps insertion
order, and what PostgreSQL cannot store fails permanently.

The store must behave like ``rules.memory.InMemoryStore``: same results, same ordering, fresh
objects on every read. Errors must arrive as ``StoreError`` with the right ``retryable`` flag.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.schemas import FlowRun, FlowRunPolicy, StateType, TaskRun
from arbiter.schemas.runs import TaskRunPolicy
from arbiter.worker.db import tables
from arbiter.worker.db.store import PgStore
from tests.factories import create_flow_run, create_task_run, make_state
from tests.integration.pg_helpers import NOW, committed, impatient

pytestmark = pytest.mark.integration


def full_flow_run() -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(),
        name="nightly",
        tags=["etl", "b"],
        state_type=StateType.RUNNING,
        state_name="Running",
        state_timestamp=NOW,
        run_count=2,
        expected_start_time=NOW - dt.timedelta(minutes=1),
        next_scheduled_start_time=NOW + dt.timedelta(hours=1),
        start_time=NOW - dt.timedelta(seconds=30),
        end_time=None,
        total_run_time=dt.timedelta(seconds=12.345678),
        flow_name="etl-flow",
        parameters={"n": 3, "nested": {"a": [1, 2.5, None, "x"]}},
        deployment_id=uuid.uuid4(),
        parent_task_run_id=uuid.uuid4(),
        idempotency_key="key-1",
        infrastructure_pid="host:123",
        empirical_policy=FlowRunPolicy(
            retries=3,
            retry_delay=10,
            pause_keys={"p1", "p2"},
            resuming=True,
            retry_type="reschedule",
        ),
    )


def full_task_run(flow_run_id: uuid.UUID | None = None) -> TaskRun:
    return TaskRun(
        id=uuid.uuid4(),
        name="extract-0",
        tags=["db"],
        run_count=1,
        start_time=NOW,
        total_run_time=dt.timedelta(milliseconds=250),
        flow_run_id=flow_run_id,
        task_key="extract",
        dynamic_key="0",
        cache_key="extract-2026",
        cache_expiration=NOW + dt.timedelta(days=1),
        task_inputs={"x": [{"input_type": "parameter", "name": "x"}]},
        flow_run_run_count=2,
        empirical_policy=TaskRunPolicy(retries=2, retry_delay=[1, 2.5], retry_jitter_factor=0.5),
    )


async def delete_flow_run(engine: AsyncEngine, run_id: uuid.UUID) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.delete(tables.flow_run).where(tables.flow_run.c.id == run_id))


@pytest.fixture
async def committed_flow_run(pg_engine: AsyncEngine) -> AsyncIterator[FlowRun]:
    run = FlowRun(id=uuid.uuid4(), name="committed")
    async with committed(pg_engine) as store:
        await store.create_run("flow_run", run)
    yield run
    await delete_flow_run(pg_engine, run.id)


class TestRuns:
    async def test_flow_run_round_trips_every_column(self, pg_store: PgStore) -> None:
        """A created flow run reads back equal, field for field."""
        run = full_flow_run()
        await pg_store.create_run("flow_run", run)
        assert await pg_store.read_flow_run(run.id) == run
        assert await pg_store.lock_run("flow_run", run.id) == run

    async def test_task_run_round_trips_every_column(self, pg_store: PgStore) -> None:
        """A created task run reads back equal, even when its flow run does not exist (no FK)."""
        run = full_task_run(flow_run_id=uuid.uuid4())
        await pg_store.create_run("task_run", run)
        assert await pg_store.read_task_run(run.id) == run
        assert await pg_store.lock_task_run(run.id) == run

    async def test_unknown_or_other_kind_reads_none(self, pg_store: PgStore) -> None:
        """Reads by the wrong kind or an unknown id find nothing."""
        flow = await create_flow_run(pg_store)
        assert await pg_store.read_task_run(flow.id) is None
        assert await pg_store.lock_run("task_run", flow.id) is None
        assert await pg_store.lock_run("flow_run", uuid.uuid4()) is None
        assert await pg_store.read_flow_run(uuid.uuid4()) is None

    async def test_run_kind_of(self, pg_store: PgStore) -> None:
        """The kind of an id is found in whichever run table holds it."""
        flow = await create_flow_run(pg_store)
        task = await create_task_run(pg_store, flow_run_id=flow.id)
        assert await pg_store.run_kind_of(flow.id) == "flow_run"
        assert await pg_store.run_kind_of(task.id) == "task_run"
        assert await pg_store.run_kind_of(uuid.uuid4()) is None

    async def test_current_state_is_loaded_with_the_run(self, pg_store: PgStore) -> None:
        """After insert_state + save_run, the run reads back with that state as current."""
        run = await create_flow_run(pg_store)
        state = make_state(StateType.SCHEDULED, timestamp=NOW, message="later", data={"k": 1})
        await pg_store.insert_state("flow_run", run, state)
        run.state = state
        run.state_type, run.state_name, run.state_timestamp = state.type, state.name, NOW
        await pg_store.save_run("flow_run", run)

        locked = await pg_store.lock_run("flow_run", run.id)
        assert locked == run
        assert locked is not None
        assert locked.state == state
        assert locked.state.state_details.scheduled_time == NOW

    async def test_reads_return_fresh_objects(self, pg_store: PgStore) -> None:
        """Mutating a returned run or state never changes what the next read returns."""
        run = await create_flow_run(pg_store, tags=["a"])
        state = make_state(StateType.RUNNING, timestamp=NOW)
        await pg_store.insert_state("flow_run", run, state)
        run.state = state
        await pg_store.save_run("flow_run", run)

        first = await pg_store.read_flow_run(run.id)
        assert first is not None
        assert first.state is not None
        first.tags.append("mutated")
        first.state.name = "Mutated"
        state.name = "Mutated too"
        second = await pg_store.read_flow_run(run.id)
        assert second is not None
        assert second.state is not None
        assert second is not first
        assert second.state is not first.state
        assert second.tags == ["a"]
        assert second.state.name == "Running"

    async def test_save_run_writes_every_bookkeeping_column(self, pg_store: PgStore) -> None:
        """save_run persists whatever the rules changed, policy included."""
        run = await create_task_run(pg_store, flow_run_id=None)
        run.run_count = 4
        run.flow_run_run_count = 2
        run.start_time, run.end_time = NOW, NOW + dt.timedelta(seconds=3)
        run.total_run_time = dt.timedelta(seconds=3)
        run.expected_start_time = NOW
        run.next_scheduled_start_time = NOW + dt.timedelta(minutes=5)
        run.state_type, run.state_name, run.state_timestamp = StateType.FAILED, "Failed", NOW
        run.empirical_policy.retries = 9
        await pg_store.save_run("task_run", run)
        assert await pg_store.read_task_run(run.id) == run

    async def test_save_run_of_a_missing_run_is_a_permanent_error(self, pg_store: PgStore) -> None:
        """Saving a run that was never created fails instead of silently writing nothing."""
        with pytest.raises(StoreError) as caught:
            await pg_store.save_run("flow_run", FlowRun(id=uuid.uuid4()))
        assert not caught.value.retryable

    async def test_create_run_twice_is_a_permanent_error(self, pg_store: PgStore) -> None:
        """create_run on a taken id is a unique violation: not retryable."""
        run = await create_flow_run(pg_store)
        with pytest.raises(StoreError) as caught:
            await pg_store.create_run("flow_run", run)
        assert not caught.value.retryable

    async def test_create_run_with_a_state_records_it(self, pg_store: PgStore) -> None:
        """A run created with a state reads back with it, and it is its first history entry."""
        state = make_state(StateType.PENDING, timestamp=NOW)
        run = TaskRun(id=uuid.uuid4(), state=state, state_type=StateType.PENDING)
        await pg_store.create_run("task_run", run)
        assert await pg_store.read_task_run(run.id) == run
        assert await pg_store.read_history("task_run", run.id) == [state]

    async def test_lock_run_holds_the_row_lock(
        self, pg_engine: AsyncEngine, committed_flow_run: FlowRun
    ) -> None:
        """While one transaction holds the run, another times out with a retryable error."""
        async with committed(pg_engine) as holder:
            assert await holder.lock_run("flow_run", committed_flow_run.id) is not None
            async with impatient(pg_engine) as waiter:
                with pytest.raises(StoreError) as caught:
                    await waiter.lock_run("flow_run", committed_flow_run.id)
                assert caught.value.retryable
                assert "55P03" in str(caught.value)

    async def test_plain_reads_do_not_wait_for_the_lock(
        self, pg_engine: AsyncEngine, committed_flow_run: FlowRun
    ) -> None:
        """read_flow_run is lock-free: a parent read never blocks on a busy run."""
        async with committed(pg_engine) as holder:
            await holder.lock_run("flow_run", committed_flow_run.id)
            async with impatient(pg_engine) as reader:
                assert await reader.read_flow_run(committed_flow_run.id) == committed_flow_run


class TestStates:
    async def test_history_is_in_insertion_order(self, pg_store: PgStore) -> None:
        """History is oldest-inserted first, even with equal or decreasing timestamps."""
        run = await create_task_run(pg_store, flow_run_id=None)
        states = [
            make_state(StateType.PENDING, timestamp=NOW),
            make_state(StateType.RUNNING, timestamp=NOW),
            make_state(StateType.FAILED, timestamp=NOW - dt.timedelta(seconds=1)),
            make_state(StateType.SCHEDULED, timestamp=NOW + dt.timedelta(seconds=1)),
        ]
        for state in states:
            await pg_store.insert_state("task_run", run, state)
        assert await pg_store.read_history("task_run", run.id) == states
        assert await pg_store.read_history("flow_run", run.id) == []

    async def test_state_round_trips_every_field(self, pg_store: PgStore) -> None:
        """Details, data (JSON or none) and message survive the database."""
        run = await create_flow_run(pg_store)
        details = {
            "flow_run_id": run.id,
            "scheduled_time": NOW,
            "cache_key": "k",
            "cache_expiration": NOW,
            "pause_key": "p",
            "run_input_keyset": {"a": "b"},
            "retriable": True,
            "transition_id": uuid.uuid4(),
        }
        rich = make_state(
            StateType.PAUSED,
            name="Suspended",
            timestamp=NOW,
            details=details,
            data={"storage": "s3", "path": ["a", 1, 2.5, True, None]},
            message="waiting for input",
        )
        scalar = make_state(StateType.COMPLETED, timestamp=NOW, data="just a string")
        empty = make_state(StateType.RUNNING, timestamp=NOW)
        for state in (rich, scalar, empty):
            await pg_store.insert_state("flow_run", run, state)
        assert await pg_store.read_history("flow_run", run.id) == [rich, scalar, empty]

    async def test_flow_state_timestamp_taken(self, pg_store: PgStore) -> None:
        """Only an exactly equal timestamp of this flow run counts as taken."""
        run = await create_flow_run(pg_store)
        other = await create_flow_run(pg_store)
        await pg_store.insert_state("flow_run", run, make_state(StateType.PENDING, timestamp=NOW))
        assert await pg_store.flow_state_timestamp_taken(run.id, NOW)
        assert await pg_store.flow_state_timestamp_taken(
            run.id, NOW.astimezone(dt.timezone(dt.timedelta(hours=2)))
        )
        assert not await pg_store.flow_state_timestamp_taken(
            run.id, NOW + dt.timedelta(microseconds=1)
        )
        assert not await pg_store.flow_state_timestamp_taken(other.id, NOW)

    async def test_nul_character_is_refused_without_aborting_the_transaction(
        self, pg_store: PgStore
    ) -> None:
        """A state PostgreSQL cannot store fails permanently, and the transaction still works."""
        run = await create_flow_run(pg_store)
        for bad in (
            make_state(StateType.RUNNING, message="a\x00b"),
            make_state(StateType.RUNNING, data={"k": ["\x00"]}),
            make_state(StateType.RUNNING, details={"cache_key": "\x00"}),
        ):
            with pytest.raises(StoreError) as caught:
                await pg_store.insert_state("flow_run", run, bad)
            assert not caught.value.retryable
        await pg_store.save_run("flow_run", run)
        assert await pg_store.read_history("flow_run", run.id) == []
