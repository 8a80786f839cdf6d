"""The schema and its migrations against a real PostgreSQL: upgrades are idempotent and
serialised by an advisory lock, build exactly ``worker.db.tables``, and keep the rows of older
revisions."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.worker.db import tables
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.migrate import MIGRATION_LOCK_KEY, alembic_config, upgrade, upgrade_async
from arbiter.worker.db.store import PgStore, ProcessedProposal
from tests.fixtures.databases import run_blocking

pytestmark = pytest.mark.integration


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
