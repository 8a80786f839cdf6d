"""PgStore, the schema and the migrations against a real PostgreSQL.

The store must behave like ``rules.memory.InMemoryStore``: same results, same
ordering, fresh objects on every read. Errors must arrive as ``StoreError``
with the right ``retryable`` flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from rules.errors import StoreError
from rules.store import AdminStore, TagLimit
from schemas import FlowRun, FlowRunPolicy, State, StateDetails, StateType, TaskRun
from schemas.runs import TaskRunPolicy
from schemas.states import utcnow
from tests.factories import create_flow_run, create_task_run, initialize_orchestration, make_state
from worker.db import tables
from worker.db.engine import asyncpg_url, create_engine
from worker.db.migrate import MIGRATION_LOCK_KEY, alembic_config, upgrade, upgrade_async
from worker.db.store import PgStore, ProcessedProposal, is_transient, translate_db_error

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 26, 16, 0, tzinfo=dt.UTC)


def as_admin_store(store: PgStore) -> AdminStore:
    """mypy checks here that PgStore satisfies the AdminStore Protocol."""
    return store


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


@contextlib.asynccontextmanager
async def committed(engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A store whose writes are committed, for tests that need a second connection to see them."""
    async with engine.begin() as connection:
        yield PgStore(connection)


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


@pytest.fixture
async def committed_tag(pg_engine: AsyncEngine) -> AsyncIterator[str]:
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    async with committed(pg_engine) as store:
        await store.upsert_tag_limit(tag, 1)
    yield tag
    async with committed(pg_engine) as store:
        await store.delete_tag_limit(tag)


@contextlib.asynccontextmanager
async def impatient(engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A store in its own transaction that gives up on a row lock after 50 ms."""
    async with engine.connect() as connection, connection.begin():
        await connection.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
        yield PgStore(connection)


# --- migrations -------------------------------------------------------------------------------


class TestMigrations:
    async def test_upgrade_twice_is_a_no_op(
        self, database_url: str, pg_engine: AsyncEngine
    ) -> None:
        """Upgrading an up-to-date database changes nothing, blocking (in a loop) or async."""
        upgrade(database_url)
        upgrade(database_url)
        await upgrade_async(database_url)
        async with pg_engine.connect() as connection:
            versions = (await connection.execute(sa.text("SELECT * FROM alembic_version"))).all()
        assert [tuple(row) for row in versions] == [(head_revision(database_url),)]

    def test_concurrent_upgrades_of_a_migrated_database_succeed(self, database_url: str) -> None:
        """Two processes running ``arbiter migrate`` at once both succeed."""
        run_in_threads(lambda: upgrade(database_url), count=2)

    async def test_upgrade_waits_for_the_migration_lock(
        self, database_url: str, pg_engine: AsyncEngine
    ) -> None:
        """An upgrade blocks while another holds the advisory lock, then completes."""
        done = threading.Event()
        failures: list[BaseException] = []

        def migrate() -> None:
            try:
                upgrade(database_url)
            except BaseException as exc:
                failures.append(exc)
            finally:
                done.set()

        async with pg_engine.connect() as holder:
            lock = sa.text("SELECT pg_advisory_lock(:key)")
            await holder.execute(lock, {"key": MIGRATION_LOCK_KEY})
            thread = threading.Thread(target=migrate)
            thread.start()
            try:
                await asyncio.sleep(0.5)
                assert not done.is_set()
            finally:
                unlock = sa.text("SELECT pg_advisory_unlock(:key)")
                await holder.execute(unlock, {"key": MIGRATION_LOCK_KEY})
                await holder.commit()
            await asyncio.to_thread(thread.join, 30)
        assert done.is_set()
        assert failures == []

    def test_concurrent_upgrades_of_an_empty_database_create_the_schema_once(
        self, empty_database_url: str
    ) -> None:
        """The first upgrade builds the schema; the one racing it waits, then finds head."""
        run_in_threads(lambda: upgrade(empty_database_url), count=2)
        assert schema_diff(empty_database_url) == []

    def test_migration_creates_exactly_the_tables_module(self, database_url: str) -> None:
        """The migrations and ``worker.db.tables`` describe the same schema."""
        assert schema_diff(database_url) == []

    def test_upgrading_from_0001_keeps_recorded_proposals_and_downgrades(
        self, empty_database_url: str
    ) -> None:
        """0002 adds the outbox column: proposals recorded before it read back with an empty
        outbox, so their replays still work; downgrading to 0001 removes it again."""
        config = alembic_config(empty_database_url)
        command.upgrade(config, "0001")
        proposal_id = uuid.uuid4()

        async def record_before() -> None:
            engine = create_engine(empty_database_url, pool_size=1)
            try:
                async with engine.begin() as connection:
                    insert = sa.text(
                        "INSERT INTO processed_proposal"
                        " (proposal_id, body_sha256, run_kind, run_id, status, outcome)"
                        " VALUES (:id, 'ab', 'flow_run', :run, 'ACCEPT', '{\"a\": 1}')"
                    )
                    await connection.execute(insert, {"id": proposal_id, "run": uuid.uuid4()})
            finally:
                await engine.dispose()

        async def find() -> list[object]:
            engine = create_engine(empty_database_url, pool_size=1)
            try:
                async with engine.connect() as connection:
                    return [await PgStore(connection).find_processed(proposal_id)]
            finally:
                await engine.dispose()

        run_blocking(record_before())
        upgrade(empty_database_url)

        (found,) = run_blocking(find())
        assert isinstance(found, ProcessedProposal)
        assert json.loads(found.outcome_json) == {"a": 1}
        assert found.outbox_json == "[]"
        assert schema_diff(empty_database_url) == []

        command.downgrade(config, "0001")
        assert any("outbox" in repr(diff) for diff in schema_diff(empty_database_url))

    async def test_constraint_and_index_names_match_the_tables_module(
        self, pg_engine: AsyncEngine
    ) -> None:
        """Every constraint and index has the name ``tables`` gives it, so later migrations can
        address them (autogenerate does not compare CHECK constraint names)."""
        expected = {
            (table.name, name)
            for table in tables.metadata.tables.values()
            for name in [*(c.name for c in table.constraints), *(i.name for i in table.indexes)]
        }
        query = sa.text(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint"
            " WHERE conrelid::regclass::text = ANY(:tables) AND contype IN ('p', 'f', 'c', 'u')"
            " UNION SELECT tablename, indexname FROM pg_indexes"
            " WHERE tablename = ANY(:tables) AND schemaname = current_schema()"
            " AND indexname NOT LIKE 'pk\\_%'"
        )
        async with pg_engine.connect() as connection:
            rows = await connection.execute(query, {"tables": list(tables.metadata.tables)})
            actual = {(table, name) for table, name in rows}
        assert actual == expected


def run_in_threads(target: object, *, count: int) -> None:
    assert callable(target)
    failures: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run() -> None:
        barrier.wait()
        try:
            target()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def schema_diff(database_url: str) -> list[object]:
    """Alembic's autogenerate comparison of the live schema against ``tables.metadata``."""

    def compare(connection: Connection) -> list[object]:
        opts = {"compare_type": True, "compare_server_default": True}
        context = MigrationContext.configure(connection, opts=opts)
        return list(compare_metadata(context, tables.metadata))

    async def run() -> list[object]:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(compare)
        finally:
            await engine.dispose()

    return run_blocking(run())


def run_blocking(coroutine: object) -> list[object]:
    """Run a coroutine to completion on a fresh loop in a helper thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        result: list[object] = pool.submit(asyncio.run, coroutine).result()  # type: ignore[arg-type]
    return result


@pytest.fixture
def empty_database_url(database_url: str) -> Iterator[str]:
    """A new, empty database on the same server; skipped when the role may not create one."""
    name = f"arbiter_test_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(sa.text(statement))
        finally:
            await engine.dispose()

    try:
        run_blocking(admin(f'CREATE DATABASE "{name}"'))
    except sa_exc.DBAPIError as exc:
        if "permission denied" in str(exc):
            pytest.skip("the test role may not CREATE DATABASE (grant it CREATEDB to run this)")
        raise
    try:
        yield asyncpg_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        run_blocking(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


# --- engine -----------------------------------------------------------------------------------


class TestEngine:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("postgresql://u:p@h:5/d", "postgresql+asyncpg://u:p@h:5/d"),
            ("postgres://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
            ("postgresql+asyncpg://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
            ("postgresql://u:p@h/d?sslmode=require", "postgresql+asyncpg://u:p@h/d?ssl=require"),
        ],
    )
    def test_urls_are_normalised_to_asyncpg(self, given: str, expected: str) -> None:
        """libpq and SQLAlchemy URL forms both end up on the asyncpg driver."""
        assert asyncpg_url(given).render_as_string(hide_password=False) == expected

    def test_other_databases_are_refused(self) -> None:
        """A URL for another database or driver is a clear ValueError."""
        with pytest.raises(ValueError, match="mysql://"):
            asyncpg_url("mysql://u:p@h/d")
        with pytest.raises(ValueError, match="postgresql\\+psycopg://"):
            asyncpg_url("postgresql+psycopg://u:p@h/d")

    async def test_sessions_carry_application_name_and_lock_timeout(
        self, database_url: str
    ) -> None:
        """Connections name themselves and bound their lock waits as configured."""
        engine = create_engine(database_url, pool_size=1, lock_timeout_s=1.5)
        try:
            async with engine.connect() as connection:
                name = (await connection.execute(sa.text("SHOW application_name"))).scalar()
                timeout = (await connection.execute(sa.text("SHOW lock_timeout"))).scalar()
        finally:
            await engine.dispose()
        assert name == "arbiter"
        assert timeout == "1500ms"


# --- runs -------------------------------------------------------------------------------------


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

    async def test_create_run_if_absent_keeps_the_first(self, pg_store: PgStore) -> None:
        """The second creation of the same id inserts nothing and raises nothing."""
        first = FlowRun(id=uuid.uuid4(), name="first")
        await pg_store.create_run_if_absent("flow_run", first)
        await pg_store.create_run_if_absent("flow_run", FlowRun(id=first.id, name="second"))
        assert await pg_store.read_flow_run(first.id) == first

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


# --- states -----------------------------------------------------------------------------------


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


# --- task cache -------------------------------------------------------------------------------


class TestCache:
    async def cached(
        self,
        store: PgStore,
        run: TaskRun,
        key: str,
        expiration: dt.datetime | None,
        state_type: StateType = StateType.COMPLETED,
        name: str | None = None,
    ) -> State:
        state = make_state(state_type, name=name, timestamp=NOW)
        await store.insert_state("task_run", run, state)
        await store.insert_cache_entry(key, expiration, state.id)
        return state

    async def test_expiration_past_future_and_none(self, pg_store: PgStore) -> None:
        """An entry is live while its expiration is None or after now."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, f"{key}-past", NOW - dt.timedelta(seconds=1))
        await self.cached(pg_store, run, f"{key}-now", NOW)
        future = await self.cached(pg_store, run, f"{key}-future", NOW + dt.timedelta(seconds=1))
        forever = await self.cached(pg_store, run, f"{key}-forever", None)
        assert await pg_store.find_cached_state(f"{key}-past", NOW) is None
        assert await pg_store.find_cached_state(f"{key}-now", NOW) is None
        assert await pg_store.find_cached_state(f"{key}-future", NOW) == future
        assert await pg_store.find_cached_state(f"{key}-forever", NOW) == forever
        assert await pg_store.find_cached_state(f"{key}-unknown", NOW) is None

    async def test_newest_live_completed_entry_wins(self, pg_store: PgStore) -> None:
        """The newest entry wins; expired entries and non-COMPLETED states are skipped."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, key, None, name="Oldest")
        middle = await self.cached(pg_store, run, key, NOW + dt.timedelta(days=1), name="Middle")
        await self.cached(pg_store, run, key, NOW - dt.timedelta(days=1), name="Expired")
        await self.cached(pg_store, run, key, None, state_type=StateType.FAILED)
        assert await pg_store.find_cached_state(key, NOW) == middle

    async def test_entry_without_a_state_is_skipped(self, pg_store: PgStore) -> None:
        """An entry pointing at no state is ignored, as in the in-memory store."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        state = await self.cached(pg_store, run, key, None)
        await pg_store.insert_cache_entry(key, None, uuid.uuid4())
        assert await pg_store.find_cached_state(key, NOW) == state

    async def test_cached_state_is_a_fresh_object(self, pg_store: PgStore) -> None:
        """Two lookups return equal but distinct states."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, key, None)
        first = await pg_store.find_cached_state(key, NOW)
        second = await pg_store.find_cached_state(key, NOW)
        assert first == second
        assert first is not second


# --- tag limits -------------------------------------------------------------------------------


class TestTagLimits:
    async def test_upsert_list_and_delete(self, pg_store: PgStore) -> None:
        """Limits list in code-point order; delete tells whether there was one."""
        prefix = uuid.uuid4().hex[:8]
        for tag, size in [("b", 2), ("B", 1), ("é", 3), ("a", 0)]:
            await pg_store.upsert_tag_limit(f"{prefix}-{tag}", size)
        mine = [t for t in await pg_store.list_tag_limits() if t.tag.startswith(prefix)]
        assert mine == [
            TagLimit(f"{prefix}-B", 1),
            TagLimit(f"{prefix}-a", 0),
            TagLimit(f"{prefix}-b", 2),
            TagLimit(f"{prefix}-é", 3),
        ]
        assert await pg_store.delete_tag_limit(f"{prefix}-b")
        assert not await pg_store.delete_tag_limit(f"{prefix}-b")
        assert f"{prefix}-b" not in {t.tag for t in await pg_store.list_tag_limits()}

    async def test_upsert_keeps_active_slots(self, pg_store: PgStore) -> None:
        """Resizing a limit keeps the slots already held."""
        tag = uuid.uuid4().hex
        await pg_store.upsert_tag_limit(tag, 1)
        [limit] = await pg_store.lock_tag_limits([tag])
        limit.active_slots.append("run-1")
        await pg_store.save_tag_limit(limit)
        await pg_store.upsert_tag_limit(tag, 5)
        assert await pg_store.lock_tag_limits([tag]) == [TagLimit(tag, 5, ["run-1"])]

    async def test_lock_tag_limits_sorted_deduplicated_existing_only(
        self, pg_store: PgStore
    ) -> None:
        """Only existing limits come back, once each, in code-point order, as copies."""
        prefix = uuid.uuid4().hex[:8]
        for tag in ("z", "a", "M"):
            await pg_store.upsert_tag_limit(f"{prefix}-{tag}", 1)
        wanted = [f"{prefix}-{t}" for t in ("z", "missing", "a", "z", "M")]
        limits = await pg_store.lock_tag_limits(wanted)
        assert [t.tag for t in limits] == [f"{prefix}-M", f"{prefix}-a", f"{prefix}-z"]
        limits[0].active_slots.append("not saved")
        assert (await pg_store.lock_tag_limits([f"{prefix}-M"]))[0].active_slots == []
        assert await pg_store.lock_tag_limits([]) == []

    async def test_save_tag_limit_of_a_missing_tag_does_nothing(self, pg_store: PgStore) -> None:
        """Saving slots of a deleted limit writes nothing, as in the in-memory store."""
        tag = uuid.uuid4().hex
        await pg_store.save_tag_limit(TagLimit(tag, 1, ["run"]))
        assert await pg_store.lock_tag_limits([tag]) == []

    async def test_lock_tag_limits_holds_the_row_locks(
        self, pg_engine: AsyncEngine, committed_tag: str
    ) -> None:
        """A second claimer of a locked limit waits; its lock timeout is retryable."""
        async with committed(pg_engine) as holder:
            assert len(await holder.lock_tag_limits([committed_tag])) == 1
            async with impatient(pg_engine) as waiter:
                with pytest.raises(StoreError) as caught:
                    await waiter.lock_tag_limits(["another-tag", committed_tag])
                assert caught.value.retryable

    async def test_negative_limit_is_a_permanent_error(self, pg_store: PgStore) -> None:
        """The check constraint refuses a negative limit: not retryable."""
        with pytest.raises(StoreError) as caught:
            await pg_store.upsert_tag_limit(uuid.uuid4().hex, -1)
        assert not caught.value.retryable
        assert "23514" in str(caught.value)


# --- processed proposals ----------------------------------------------------------------------


class TestProcessedProposals:
    async def record(self, store: PgStore, proposal_id: uuid.UUID, outcome: object) -> None:
        await store.record_processed(
            proposal_id, "ab" * 32, "task_run", uuid.uuid4(), "ACCEPT", json.dumps(outcome)
        )

    async def test_record_then_find(self, pg_store: PgStore) -> None:
        """A recorded proposal is found with its digest, status and outcome JSON."""
        proposal_id = uuid.uuid4()
        outcome = {"status": "ACCEPT", "state": {"name": "Running", "data": [1, "é", None]}}
        await self.record(pg_store, proposal_id, outcome)
        found = await pg_store.find_processed(proposal_id)
        assert found is not None
        assert found.body_sha256 == "ab" * 32
        assert found.status == "ACCEPT"
        assert json.loads(found.outcome_json) == outcome
        assert found.outbox_json == "[]"
        assert await pg_store.find_processed(uuid.uuid4()) is None

    async def test_lock_run_and_find_processed_reads_both_in_one_call(
        self, pg_store: PgStore
    ) -> None:
        """The run (locked) and the proposal's record come back together; either may be
        missing, and a record for another proposal id is not this one's."""
        run = FlowRun(id=uuid.uuid4(), name="r")
        await pg_store.create_run("flow_run", run)
        proposal_id, other_id = uuid.uuid4(), uuid.uuid4()
        assert await pg_store.lock_run_and_find_processed(
            "flow_run", uuid.uuid4(), proposal_id
        ) == (None, None)
        found_run, known = await pg_store.lock_run_and_find_processed(
            "flow_run", run.id, proposal_id
        )
        assert found_run is not None
        assert found_run.name == "r"
        assert known is None

        await self.record(pg_store, other_id, {"status": "WAIT"})
        await self.record(pg_store, proposal_id, {"status": "ACCEPT"})
        found_run, known = await pg_store.lock_run_and_find_processed(
            "flow_run", run.id, proposal_id
        )
        assert found_run is not None
        assert found_run.id == run.id
        assert known is not None
        assert json.loads(known.outcome_json) == {"status": "ACCEPT"}
        assert known == await pg_store.find_processed(proposal_id)
        wrong_kind = await pg_store.lock_run_and_find_processed("task_run", run.id, proposal_id)
        assert wrong_kind == (None, None)

    async def test_the_outbox_is_recorded_with_the_outcome(self, pg_store: PgStore) -> None:
        """What the transaction wanted published comes back, so a replay can publish it."""
        proposal_id = uuid.uuid4()
        outbox = [{"channel": "event", "routing_key": "k", "message_id": "m", "body": {"x": [1]}}]
        await pg_store.record_processed(
            proposal_id, "cd" * 32, "flow_run", uuid.uuid4(), "ACCEPT", "{}", json.dumps(outbox)
        )
        found = await pg_store.find_processed(proposal_id)
        assert found is not None
        assert json.loads(found.outbox_json) == outbox

    async def test_recording_an_id_twice_is_retryable(self, pg_store: PgStore) -> None:
        """A duplicate id means a concurrent twin: the retry will find it and replay."""
        proposal_id = uuid.uuid4()
        await self.record(pg_store, proposal_id, {})
        with pytest.raises(StoreError) as caught:
            await self.record(pg_store, proposal_id, {})
        assert caught.value.retryable

    async def test_purge_removes_only_older_records(self, pg_store: PgStore) -> None:
        """Records processed before the cutoff go; newer ones stay."""
        proposal_id = uuid.uuid4()
        await self.record(pg_store, proposal_id, {})
        assert await pg_store.purge_processed(utcnow() - dt.timedelta(days=7)) >= 0
        assert await pg_store.find_processed(proposal_id) is not None
        assert await pg_store.purge_processed(utcnow() + dt.timedelta(minutes=1)) >= 1
        assert await pg_store.find_processed(proposal_id) is None


# --- exception translation --------------------------------------------------------------------


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


class TestErrorTranslation:
    async def test_statement_timeout_is_retryable(self, pg_engine: AsyncEngine) -> None:
        """A canceled query (57014) is transient."""
        async with pg_engine.connect() as connection, connection.begin():
            await connection.execute(sa.text("SET LOCAL statement_timeout = '10ms'"))
            with pytest.raises(sa_exc.DBAPIError) as caught:
                await connection.execute(sa.text("SELECT pg_sleep(1)"))
        error = translate_db_error(caught.value)
        assert error is not None
        assert error.retryable
        assert is_transient(caught.value)

    async def test_lost_connection_is_retryable(
        self, pg_engine: AsyncEngine, database_url: str
    ) -> None:
        """A store whose server connection was terminated raises a retryable StoreError."""
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                pid = await backend_pid(connection)
                async with pg_engine.connect() as killer:
                    terminate = sa.text("SELECT pg_terminate_backend(:pid, 5000)")
                    assert (await killer.execute(terminate, {"pid": pid})).scalar()
                with pytest.raises(StoreError) as caught:
                    await PgStore(connection).read_flow_run(uuid.uuid4())
                assert caught.value.retryable
        finally:
            await engine.dispose()

    async def test_unreachable_server_is_retryable(self, database_url: str) -> None:
        """Failing to connect at all (nothing listens on the port) is transient."""
        url = make_url(database_url).set(host="127.0.0.1", port=1)
        engine = create_engine(url.render_as_string(hide_password=False), pool_size=1)
        try:
            with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever the driver raises
                await engine.connect()
        finally:
            await engine.dispose()
        assert is_transient(caught.value)

    def test_other_exceptions_are_not_database_errors(self) -> None:
        """Only database and network failures are translated."""
        assert translate_db_error(ValueError("x")) is None
        assert not is_transient(ValueError("x"))
        error = StoreError("kept", retryable=True)
        assert translate_db_error(error) is error


async def backend_pid(connection: AsyncConnection) -> int:
    pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
    assert isinstance(pid, int)
    return pid


# --- the rules on PostgreSQL ------------------------------------------------------------------


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
