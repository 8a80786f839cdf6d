"""``arbiter migrate``: bring the schema to the newest revision, once, even when racing.

There is no alembic.ini: the configuration is built here, so an installed
package migrates without any file beside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from arbiter.worker.db.engine import APPLICATION_NAME, asyncpg_url, connect_options

__all__ = ["MIGRATIONS_DIR", "MIGRATION_LOCK_KEY", "alembic_config", "upgrade", "upgrade_async"]

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")

# The advisory lock key every Arbiter process migrates under; "Arbiter!" in ASCII.
MIGRATION_LOCK_KEY = 0x4172626974657221


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for our migrations on ``database_url`` (no ini file)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates "%": a percent-encoded password must survive it.
    url = asyncpg_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# Alembic's ``context``/``op`` proxies are process globals: two threads migrating two
# databases at once (the advisory lock is per database) would run on each other's connection.
_ALEMBIC_IN_USE = threading.Lock()


def _upgrade_on(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    with _ALEMBIC_IN_USE:
        command.upgrade(config, revision)


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    """Upgrade to ``revision`` in one transaction that holds a PostgreSQL advisory lock.

    Two processes migrating at once serialize on the lock; the second then finds
    the schema at head and does nothing. PostgreSQL's transactional DDL means a
    failed migration leaves no half-built schema.
    """
    config = alembic_config(database_url)
    url, tls = connect_options(database_url)
    engine = create_async_engine(
        url,
        poolclass=pool.NullPool,
        connect_args={
            "server_settings": {"application_name": f"{APPLICATION_NAME}-migrate"},
            **tls,
        },
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            await connection.run_sync(_upgrade_on, config, revision)
    finally:
        await engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking ``upgrade_async``; from inside a running event loop it uses a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(upgrade_async(database_url, revision))
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arbiter-migrate") as pool:
        pool.submit(asyncio.run, upgrade_async(database_url, revision)).result()
