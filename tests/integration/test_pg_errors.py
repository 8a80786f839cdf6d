"""Database errors against a real PostgreSQL: timeouts, lost connections and an unreachable
server become retryable ``StoreError``s; other exceptions are not database errors."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore, is_transient, translate_db_error

pytestmark = pytest.mark.integration


class TestErrorTranslation:
    async def test_statement_timeout_is_retryable(self, pg_engine: AsyncEngine) -> None:
        """A canceled query (57014) is transient."""
        async with pg_engine.connect() as connection, connection.begin():
            await connection.execute(sa.text("SET LOCAL statement_timeout = '10ms'"))
            with pytest.raises(sa_exc.DBAPIError) as caught:
                await connection.execute(sa.text("SELECT pg_sleep(1)"))
        error = translate_db_error(caught.value)
        assert error is not None
        assert error.retryable
        assert is_transient(caught.value)

    async def test_lost_connection_is_retryable(
        self, pg_engine: AsyncEngine, database_url: str
    ) -> None:
        """A store whose server connection was terminated raises a retryable StoreError."""
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                pid = await backend_pid(connection)
                async with pg_engine.connect() as killer:
                    terminate = sa.text("SELECT pg_terminate_backend(:pid, 5000)")
                    assert (await killer.execute(terminate, {"pid": pid})).scalar()
                with pytest.raises(StoreError) as caught:
                    await PgStore(connection).read_flow_run(uuid.uuid4())
                assert caught.value.retryable
        finally:
            await engine.dispose()

    async def test_unreachable_server_is_retryable(self, database_url: str) -> None:
        """Failing to connect at all (nothing listens on the port) is transient."""
        url = make_url(database_url).set(host="127.0.0.1", port=1)
        engine = create_engine(url.render_as_string(hide_password=False), pool_size=1)
        try:
            with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever the driver raises
                await engine.connect()
        finally:
            await engine.dispose()
        assert is_transient(caught.value)

    def test_other_exceptions_are_not_database_errors(self) -> None:
        """Only database and network failures are translated."""
        assert translate_db_error(ValueError("x")) is None
        assert not is_transient(ValueError("x"))
        error = StoreError("kept", retryable=True)
        assert translate_db_error(error) is error


async def backend_pid(connection: AsyncConnection) -> int:
    pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
    assert isinstance(pid, int)
    return pid
