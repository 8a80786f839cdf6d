"""Integration fixtures for the store: one engine on the session's migrated database.

``database_url`` (tests/fixtures/services.py) gets the servers from
``devtools.devservices.provide_services()`` and runs ``upgrade()`` once per session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.worker.db.store import PgStore


@pytest.fixture
async def pg_store(pg_engine: AsyncEngine) -> AsyncIterator[PgStore]:
    """A store inside a transaction that is rolled back after the test: no test sees another's
    rows, and none are left behind."""
    async with pg_engine.connect() as connection:
        transaction = await connection.begin()
        try:
            yield PgStore(connection)
        finally:
            await transaction.rollback()
