"""Helpers shared by the PgStore tests: a fixed clock, and stores in their own transactions
(committed, or impatient for row locks) for tests that need a second connection."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.worker.db.store import PgStore

NOW = dt.datetime(2026, 11, 26, 16, 0, tzinfo=dt.UTC)


@contextlib.asynccontextmanager
async def committed(engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A store whose writes are committed, for tests that need a second connection to see them."""
    async with engine.begin() as connection:
        yield PgStore(connection)


@contextlib.asynccontextmanager
async def impatient(engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A store in its own transaction that gives up on a row lock after 50 ms."""
    async with engine.connect() as connection, connection.begin():
        await connection.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
        yield PgStore(connection)
