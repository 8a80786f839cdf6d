"""The asyncpg engine every database user in the worker shares."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["APPLICATION_NAME", "asyncpg_url", "create_engine"]

APPLICATION_NAME = "arbiter"  # shows in pg_stat_activity, so operators can tell our sessions


def asyncpg_url(database_url: str) -> URL:
    """Any PostgreSQL URL (libpq or SQLAlchemy form) as an asyncpg URL; ValueError otherwise.

    libpq's ``sslmode`` query option becomes asyncpg's ``ssl``, so a URL copied from
    a hosting provider works unchanged.
    """
    url = make_url(database_url)
    if url.drivername not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise ValueError(f"not a postgresql:// or postgresql+asyncpg:// URL: {url.drivername}://")
    url = url.set(drivername="postgresql+asyncpg")
    if "sslmode" in url.query:
        query = dict(url.query)
        query["ssl"] = query.pop("sslmode")
        url = url.set(query=query)
    return url


def _json_dumps(value: Any) -> str:
    """JSON for JSONB binds; UUIDs, datetimes and sets too, in case a caller passes them raw."""
    return pydantic_core.to_json(value).decode()


def create_engine(
    database_url: str, *, pool_size: int = 10, lock_timeout_s: float | None = None
) -> AsyncEngine:
    """An asyncpg engine whose pool keeps ``pool_size`` connections open.

    No pre-ping: a dead pooled connection fails the statement with a retryable
    ``StoreError`` and the transaction is retried, which is cheaper than a ping
    round trip on every checkout of the hot path. ``lock_timeout_s`` bounds how
    long a statement waits for a row lock before failing (retryably) instead of
    stalling a worker behind a stuck transaction.
    """
    server_settings = {"application_name": APPLICATION_NAME}
    if lock_timeout_s is not None:
        server_settings["lock_timeout"] = f"{max(1, round(lock_timeout_s * 1000))}ms"
    return create_async_engine(
        asyncpg_url(database_url),
        pool_size=pool_size,
        pool_pre_ping=False,
        json_serializer=_json_dumps,
        json_deserializer=json.loads,
        connect_args={"server_settings": server_settings},
    )
