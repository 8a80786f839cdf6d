"""The hot path's transaction (asyncpg's own, on a pooled connection) on a real PostgreSQL:
every statement inside it, committed or rolled back as a whole, failures as StoreError,
and a connection it broke never reused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from arbiter.rules.errors import StoreError
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.transaction import HeldConnections, store_transaction

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


async def terminate(killer: AsyncEngine, pid: int) -> None:
    """End the server process ``pid`` serves a connection from, as a network cut would."""
    async with killer.connect() as conn:
        await conn.execute(sa.text(f"SELECT pg_terminate_backend({pid})"))


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
                await terminate(killer, pid)
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


# -- connections a consumer keeps between its transactions ------------------------------------


def checked_out(engine: AsyncEngine) -> int:
    """Connections out of the engine's pool (a QueuePool)."""
    pool = engine.pool
    assert isinstance(pool, AsyncAdaptedQueuePool)
    return pool.checkedout()


async def server_pid(engine: AsyncEngine, held: HeldConnections) -> int:
    async with store_transaction(engine, held=held) as store:
        assert store._driver is not None
        await store.lock_tag_limits(["any"])
        return store._driver.get_server_pid()


async def test_held_connections_serve_transaction_after_transaction_on_one_connection(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine)
    try:
        first = await server_pid(engine, held)
        assert await server_pid(engine, held) == first
        assert (held.idle, checked_out(engine)) == (1, 1)  # kept out of the pool
        tag = uuid.uuid4().hex
        async with store_transaction(engine, held=held) as store:
            await store.upsert_tag_limit(tag, 2)
    finally:
        await held.close()
    assert checked_out(engine) == 0
    assert await tag_exists(engine, tag)  # committed on the held connection


async def test_a_block_that_raises_rolls_back_and_the_connection_is_kept(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine)
    tag = uuid.uuid4().hex

    class Boom(Exception):
        pass

    try:
        pid = await server_pid(engine, held)

        async def write_then_fail() -> None:
            async with store_transaction(engine, held=held) as store:
                await store.upsert_tag_limit(tag, 2)
                raise Boom

        with pytest.raises(Boom):
            await write_then_fail()
        assert await server_pid(engine, held) == pid  # rolled back cleanly: reusable
    finally:
        await held.close()
    assert not await tag_exists(engine, tag)


async def test_a_held_connection_killed_mid_transaction_is_not_kept(
    engine: AsyncEngine, database_url: str
) -> None:
    held = HeldConnections(engine)
    killer = create_engine(database_url, pool_size=1)
    try:
        pid = await server_pid(engine, held)

        async def killed_midway() -> None:
            async with store_transaction(engine, held=held) as store:
                await terminate(killer, pid)
                await store.lock_tag_limits(["any"])

        with pytest.raises(StoreError) as caught:
            await killed_midway()
        assert caught.value.retryable
        assert held.idle == 0
        assert await server_pid(engine, held) != pid
    finally:
        await held.close()
        await killer.dispose()


async def test_a_connection_in_use_when_closing_goes_back_to_the_pool_when_done(
    engine: AsyncEngine,
) -> None:
    held = HeldConnections(engine)
    async with store_transaction(engine, held=held) as store:
        await held.close()
        await store.lock_tag_limits(["any"])  # the transaction in flight is not disturbed
        assert checked_out(engine) == 1
    assert (held.idle, checked_out(engine)) == (0, 0)
