"""The asyncpg engine every database user in the worker shares."""

from __future__ import annotations

import json
import ssl
from typing import Any

import pydantic_core
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["APPLICATION_NAME", "asyncpg_url", "connect_options", "create_engine"]

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


# libpq's TLS options, read off the URL as libpq reads them (sslmode arrives renamed ``ssl``).
_TLS_OPTIONS = ("ssl", "sslrootcert", "sslcert", "sslkey")
_VERIFYING = ("verify-ca", "verify-full")


def connect_options(database_url: str) -> tuple[URL, dict[str, Any]]:
    """The asyncpg URL without libpq's TLS options, and asyncpg's ``ssl`` argument they make.

    ``sslmode=verify-ca|verify-full`` checks the server's certificate against
    ``sslrootcert`` (else the system's CAs), verify-full its host name too;
    ``sslcert``/``sslkey`` present a client certificate; the other modes are asyncpg's own.
    A file that cannot be read is a ValueError naming the option, never showing a key.
    """
    url = asyncpg_url(database_url)
    query = dict(url.query)
    mode, root, cert, key = (_single(query, name) for name in _TLS_OPTIONS)
    url = url.set(query=query)
    if mode is None and (cert or root):
        mode = "verify-full"  # asking for certificates means asking for TLS
    if mode is None:
        return url, {}
    if mode not in _VERIFYING and not cert:
        return url, {"ssl": mode}  # disable, allow, prefer, require: asyncpg knows them
    try:
        context = ssl.create_default_context(cafile=root)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"sslrootcert: cannot load the CA certificates: {exc}") from None
    if mode in _VERIFYING:
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"sslcert/sslkey: cannot load the client certificate: {exc}") from None
    return url, {"ssl": context}


def _single(query: dict[str, str | tuple[str, ...]], name: str) -> str | None:
    value = query.pop(name, None)
    if isinstance(value, tuple):
        raise ValueError(f"the database URL gives {name} more than once")
    return value


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
    url, tls = connect_options(database_url)
    return create_async_engine(
        url,
        pool_size=pool_size,
        pool_pre_ping=False,
        json_serializer=_json_dumps,
        json_deserializer=json.loads,
        connect_args={"server_settings": server_settings, **tls},
    )
