"""The engine against a real PostgreSQL: database URLs normalised to asyncpg, other databases
refused, and sessions that name themselves and bound their lock waits."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from arbiter.worker.db.engine import asyncpg_url, create_engine

pytestmark = pytest.mark.integration


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
