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

__all__ = ["store_transaction"]

T = TypeVar("T")

_BEGIN = "BEGIN;"
_BEGIN_GENERIC_PLANS = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan;"


@contextlib.asynccontextmanager
async def store_transaction(
    engine: AsyncEngine, *, generic_plans: bool = False
) -> AsyncIterator[PgStore]:
    """A ``PgStore`` in a new transaction, committed when the block ends, rolled back if it
    raises. Database failures, the commit's included, come out as ``StoreError``; a
    connection they broke is invalidated, never handed out again, and the failure is
    retryable (a new transaction gets a new connection). ``generic_plans``: the
    transaction's prepared statements use their generic plans (see above)."""
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
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
    except Exception as exc:
        error = translate_db_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc


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
