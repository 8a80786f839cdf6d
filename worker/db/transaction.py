"""The hot path's transaction: asyncpg's own, on a connection from SQLAlchemy's pool.

``engine.begin()`` wraps BEGIN and COMMIT in SQLAlchemy's transaction objects and a
greenlet switch each, and makes the batch's first statement go through SQLAlchemy too
(its BEGIN is sent lazily, with that statement). Here the pooled connection is put in
SQLAlchemy's autocommit mode (an attribute, no round trip), so SQLAlchemy never sends a
BEGIN of its own, and the transaction is asyncpg's: every statement of the store, the
direct ones and those still built with SQLAlchemy, runs inside it. The pool keeps doing
what it does well (checkout, reset, invalidating a broken connection).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from asyncpg import Connection
from asyncpg.transaction import Transaction
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.worker.db.errors import translate_db_error
from arbiter.worker.db.store import PgStore

__all__ = ["store_transaction"]

T = TypeVar("T")


@contextlib.asynccontextmanager
async def store_transaction(engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A ``PgStore`` in a new transaction, committed when the block ends, rolled back if it
    raises. Database failures, the commit's included, come out as ``StoreError``; a
    connection they broke is invalidated, never handed out again, and the failure is
    retryable (a new transaction gets a new connection)."""
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            transaction = await _settling(conn, driver, _begin(driver))
            try:
                yield PgStore(conn, driver=driver)
            except BaseException as exc:
                if driver.is_closed():
                    await conn.invalidate(exc if isinstance(exc, Exception) else None)
                else:
                    await _settling(conn, driver, transaction.rollback())
                raise
            await _settling(conn, driver, transaction.commit())
    except Exception as exc:
        error = translate_db_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc


async def _begin(driver: Connection) -> Transaction:
    transaction = driver.transaction()  # raises already if the connection is closed
    await transaction.start()
    return transaction


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
