"""Alembic's environment: run the migrations on a connection, never autogenerate at runtime.

``worker.db.migrate`` hands in a connection that already holds the migration lock
(``config.attributes["connection"]``) and owns its transaction. Without one (a
plain ``alembic`` command pointed at this directory), env.py opens its own
asyncpg engine from ``sqlalchemy.url``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from arbiter.worker.db.engine import asyncpg_url
from arbiter.worker.db.tables import metadata

config = context.config
target_metadata = metadata


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_on_own_engine(url: str) -> None:
    engine = create_async_engine(asyncpg_url(url), poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


def _run_offline(url: str) -> None:
    """``alembic upgrade --sql``: print the DDL instead of running it."""
    context.configure(
        url=asyncpg_url(url),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    url = config.get_main_option("sqlalchemy.url") or ""
    if context.is_offline_mode():
        _run_offline(url)
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run_on(connection)
    else:
        asyncio.run(_run_on_own_engine(url))


_main()
