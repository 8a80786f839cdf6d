"""The hot path's transaction: asyncpg's own, on a connection from SQLAlchemy's pool.

``engine.begin()`` wraps BEGIN and COMMIT in SQLAlchemy's transaction objects and a
greenlet switch each, and makes the batch's first statement go through SQLAlchemy too
(its BEGIN is sent lazily, with that statement). Here the pooled connection is put in
SQLAlchemy's autocommit mode (an attribute, no round trip), so SQLAlchemy never sends a
BEGIN of its own, and the transaction is asyncpg's: every statement of the store, the
direct ones and those still built with SQLAlchemy, runs inside it. The pool keeps doing
what it does well (checkout, reset, invalidating a broken connection).

BEGIN, COMMIT and ROLLBACK are sent as plain queries (what asyncpg's ``Transaction`` sends),
so that the consumer's BEGIN can carry ``SET LOCAL plan_cache_mode = force_generic_plan`` in
the same round trip: with PostgreSQL's default (``auto``), a batch of one proposal makes the
batch read's one-element id arrays look cheapest with a custom plan, so the server planned
that statement again on every execution (about 0.5 ms of its CPU, on the round trip's path).
Its generic plan is the same index scans. The setting ends with the transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from asyncpg import Connection, InterfaceError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.worker.db.errors import translate_db_error
from arbiter.worker.db.store import PgStore

__all__ = ["HeldConnections", "store_transaction"]

T = TypeVar("T")

_BEGIN = "BEGIN;"
_BEGIN_GENERIC_PLANS = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan;"


class HeldConnections:
    """Pooled connections a consumer keeps checked out between its transactions.

    Taking a connection from SQLAlchemy's async pool and giving it back costs two greenlet
    switches and the pool's bookkeeping: 140-220 µs of CPU here with no round trip, about
    a tenth of what a batch of one proposal costs the worker. The consumer's transactions
    take theirs from here instead: checked out once (in autocommit mode, so that the
    transaction is asyncpg's, see above), kept after a clean COMMIT or ROLLBACK, and
    closed (back to the pool, or discarded if invalidated) after anything else. ``close``
    returns the idle ones; one still in use is closed when its transaction ends."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._idle: list[tuple[AsyncConnection, Connection]] = []
        self._closed = False

    async def take(self) -> tuple[AsyncConnection, Connection]:
        if self._idle:
            return self._idle.pop()
        conn = await self.engine.connect()
        try:
            return conn, await _autocommit_driver(conn)
        except BaseException:
            await conn.close()
            raise

    async def give_back(self, conn: AsyncConnection, driver: Connection) -> None:
        reusable = not (conn.invalidated or driver.is_closed() or driver.is_in_transaction())
        if reusable and not self._closed:
            self._idle.append((conn, driver))
        else:
            await conn.close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn, _ = self._idle.pop()
            await conn.close()


@contextlib.asynccontextmanager
async def store_transaction(
    engine: AsyncEngine, *, generic_plans: bool = False, held: HeldConnections | None = None
) -> AsyncIterator[PgStore]:
    """A ``PgStore`` in a new transaction, committed when the block ends, rolled back if it
    raises. Database failures, the commit's included, come out as ``StoreError``; a
    connection they broke is invalidated, never handed out again, and the failure is
    retryable (a new transaction gets a new connection). ``generic_plans``: the
    transaction's prepared statements use their generic plans (see above). ``held``: the
    connection comes from there (and goes back) instead of from the pool."""
    try:
        if held is None:
            async with engine.connect() as conn:
                driver = await _autocommit_driver(conn)
                async with _transaction(conn, driver, generic_plans) as store:
                    yield store
        else:
            conn, driver = await held.take()
            try:
                async with _transaction(conn, driver, generic_plans) as store:
                    yield store
            finally:
                await held.give_back(conn, driver)
    except Exception as exc:
        error = translate_db_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc


async def _autocommit_driver(conn: AsyncConnection) -> Connection:
    """The pooled connection in SQLAlchemy's autocommit mode (so the transaction is
    asyncpg's, see above), and its asyncpg connection."""
    await conn.execution_options(isolation_level="AUTOCOMMIT")
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, Connection)
    return driver


@contextlib.asynccontextmanager
async def _transaction(
    conn: AsyncConnection, driver: Connection, generic_plans: bool
) -> AsyncIterator[PgStore]:
    begin = _BEGIN_GENERIC_PLANS if generic_plans else _BEGIN
    await _settling(conn, driver, _begin(driver, begin))
    try:
        yield PgStore(conn, driver=driver)
    except BaseException as exc:
        if driver.is_closed():
            await conn.invalidate(exc if isinstance(exc, Exception) else None)
        else:
            await _settling(conn, driver, driver.execute("ROLLBACK;"))
        raise
    await _settling(conn, driver, driver.execute("COMMIT;"))


async def _begin(driver: Connection, query: str) -> None:
    if driver.is_in_transaction():  # as asyncpg's Transaction refuses it: never reused
        raise InterfaceError("the pooled connection is already in a transaction")
    await driver.execute(query)


async def _settling(conn: AsyncConnection, driver: Connection, step: Awaitable[T]) -> T:
    """BEGIN, COMMIT or ROLLBACK. If it fails on a connection that is gone or left in a
    state no statement can follow, the connection is invalidated and the failure retryable."""
    try:
        return await step
    except Exception as exc:
        error = translate_db_error(exc)
        if error is not None and error.retryable and not driver.is_closed():
            raise  # serialization failure, deadlock...: the connection itself is fine
        await conn.invalidate(exc)
        raise StoreError(f"database connection lost: {exc!r}", retryable=True) from exc
