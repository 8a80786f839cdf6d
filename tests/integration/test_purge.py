"""The periodic purge of processed proposal ids, on its own database (it deletes by age,
whoever recorded them)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.schemas.states import utcnow
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.migrate import upgrade_async
from arbiter.worker.db.store import PgStore
from arbiter.worker.purge import purge_processed
from tests.integration.test_pg_processed import record

pytestmark = pytest.mark.integration


async def test_a_purge_forgets_ids_past_retention_and_keeps_younger_ones(
    empty_database_url: str,
) -> None:
    await upgrade_async(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        old, young = uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            await record(PgStore(conn), old, {"status": "ACCEPT"})
        in_two_days = utcnow() + dt.timedelta(days=2)
        async with engine.begin() as conn:
            await record(PgStore(conn), young, {"status": "ACCEPT"})
            # ``old`` is recorded as of now; ``young`` as of two days on.
            await conn.exec_driver_sql(
                "UPDATE processed_proposal SET processed_at = $1 WHERE proposal_id = $2",
                (in_two_days, young),
            )
        removed = await purge_processed(engine, lambda: utcnow() + dt.timedelta(days=8), 7)
        assert removed == 1
        async with engine.connect() as conn:
            store = PgStore(conn)
            assert await store.find_processed(old) is None
            assert await store.find_processed(young) is not None
    finally:
        await engine.dispose()


async def test_a_failed_purge_is_logged_and_counts_nothing(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(empty_database_url)  # never migrated: no table to purge
    try:
        assert await purge_processed(engine, utcnow, 7) == 0
    finally:
        await engine.dispose()
    assert "purging processed proposals failed" in caplog.text
