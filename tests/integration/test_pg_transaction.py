"""The hot path's transaction (asyncpg's own, on a pooled connection) on a real PostgreSQL:
every statement inside it, committed or rolled back as a whole, failures as StoreError,
and a connection it broke never reused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.transaction import store_transaction

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=1)
    yield engine
    await engine.dispose()


async def tag_exists(engine: AsyncEngine, tag: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.execute(
            sa.text("SELECT 1 FROM concurrency_limit WHERE tag = :tag"), {"tag": tag}
        )
        return found.first() is not None


async def test_what_the_block_writes_is_committed_when_it_ends(engine: AsyncEngine) -> None:
    tag = uuid.uuid4().hex
    async with store_transaction(engine) as store:
        await store.upsert_tag_limit(tag, 2)  # a statement built with SQLAlchemy
        assert [limit.tag for limit in await store.lock_tag_limits([tag])] == [tag]  # direct
    assert await tag_exists(engine, tag)


async def test_an_error_in_the_block_rolls_back_both_kinds_of_statement(
    engine: AsyncEngine,
) -> None:
    tag = uuid.uuid4().hex

    class Boom(Exception):
        pass

    async def write_then_fail() -> None:
        async with store_transaction(engine) as store:
            await store.upsert_tag_limit(tag, 2)
            await store.lock_tag_limits([tag])
            raise Boom

    with pytest.raises(Boom):
        await write_then_fail()
    assert not await tag_exists(engine, tag)


async def test_statements_run_inside_one_transaction(engine: AsyncEngine) -> None:
    """Both paths see the same transaction id: nothing runs in autocommit."""
    async with store_transaction(engine) as store:
        via_sqlalchemy = await store._conn.scalar(sa.text("SELECT txid_current()"))
        assert store._driver is not None
        direct = await store._driver.fetchval("SELECT txid_current()")
    assert via_sqlalchemy == direct


async def test_a_refused_statement_is_a_permanent_store_error(engine: AsyncEngine) -> None:
    with pytest.raises(StoreError) as caught:
        async with store_transaction(engine) as store:
            await store.upsert_tag_limit(uuid.uuid4().hex, -1)
    assert not caught.value.retryable
    async with store_transaction(engine) as store:  # the connection is fine afterwards
        assert await store.lock_tag_limits([uuid.uuid4().hex]) == []


async def test_a_connection_killed_mid_transaction_is_retryable_and_not_reused(
    engine: AsyncEngine, database_url: str
) -> None:
    killer = create_engine(database_url, pool_size=1)
    try:
        pid = 0

        async def killed_midway() -> None:
            nonlocal pid
            async with store_transaction(engine) as store:
                assert store._driver is not None
                pid = store._driver.get_server_pid()
                async with killer.connect() as conn:
                    await conn.execute(sa.text(f"SELECT pg_terminate_backend({pid})"))
                await store.lock_tag_limits(["any"])

        with pytest.raises(StoreError) as caught:
            await killed_midway()
        assert caught.value.retryable
        async with store_transaction(engine) as store:  # a fresh connection, not the dead one
            assert store._driver is not None
            assert store._driver.get_server_pid() != pid
            assert await store.lock_tag_limits([uuid.uuid4().hex]) == []
    finally:
        await killer.dispose()


async def test_a_pooled_connection_that_died_idle_is_retryable_and_replaced(
    engine: AsyncEngine,
) -> None:
    """No pre-ping: the dead connection fails its BEGIN, retryably, and is not reused."""
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        driver.terminate()  # as if the network had cut it while it sat in the pool

    async def use() -> None:
        async with store_transaction(engine) as store:
            await store.lock_tag_limits(["any"])

    with pytest.raises(StoreError) as caught:
        await use()
    assert caught.value.retryable
    await use()
