"""Database exceptions, sorted once at the edge into retryable or permanent ``StoreError``s."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from arbiter.rules.errors import StoreError

# Failures that a new attempt of the whole transaction can get past.
_RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (server starting up)
        "53300",  # too_many_connections
    }
)
_RETRYABLE_SQLSTATE_CLASSES = ("08",)  # connection_exception and all its subclasses


def _retryable_sqlstate(sqlstate: str | None) -> bool:
    return sqlstate is not None and (
        sqlstate in _RETRYABLE_SQLSTATES or sqlstate.startswith(_RETRYABLE_SQLSTATE_CLASSES)
    )


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg error, directly or behind SQLAlchemy's DBAPI wrapper."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate
        current = current.orig if isinstance(current, sa_exc.DBAPIError) else current.__cause__
    return None


def translate_db_error(exc: BaseException) -> StoreError | None:
    """The ``StoreError`` for a database or network failure, or None for anything else.

    Retryable: lost or refused connections, serialization failures, deadlocks,
    lock and statement timeouts, server shutdown, too many connections, an
    exhausted pool. Everything else the database refuses (constraint and data
    errors, bad SQL) is permanent: the same transaction would fail the same way.
    """
    if isinstance(exc, StoreError):
        return exc
    sqlstate = _sqlstate(exc)
    if isinstance(exc, sa_exc.DBAPIError) or sqlstate is not None:
        # DBAPIError wraps every driver error raised by a statement; a bare driver
        # error (it carries a SQLSTATE) can only come from outside SQLAlchemy.
        invalidated = isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
        retryable = invalidated or _retryable_sqlstate(sqlstate)
        cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return StoreError(
            f"database error {sqlstate or type(cause).__name__}: {detail}", retryable=retryable
        )
    if isinstance(exc, OSError | TimeoutError | sa_exc.TimeoutError):
        # Network failures, connect timeouts, and no free connection in the pool.
        return StoreError(f"database unreachable: {exc!r}", retryable=True)
    if isinstance(exc, sa_exc.PendingRollbackError):
        # The connection was invalidated mid-transaction: a new transaction will reconnect.
        return StoreError(f"database connection lost: {exc}", retryable=True)
    if isinstance(exc, sa_exc.SQLAlchemyError) or type(exc).__module__.startswith("asyncpg"):
        return StoreError(f"database error: {exc!r}", retryable=False)
    return None


# What the database refuses because of the values it was given: data exceptions (22: a
# number out of range, an invalid text representation…) and integrity constraint
# violations (23). The same content fails the same way on every attempt.
_CONTENT_SQLSTATE_CLASSES = ("22", "23")


def refused_content(exc: BaseException) -> str | None:
    """The database's reason when it refused a statement for the values in it, else None."""
    sqlstate = _sqlstate(exc)
    if sqlstate is None or not sqlstate.startswith(_CONTENT_SQLSTATE_CLASSES):
        return None
    error = translate_db_error(exc)
    return str(error) if error is not None else f"database error {sqlstate}"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the whole transaction may succeed (also for errors raised at commit)."""
    error = translate_db_error(exc)
    return error is not None and error.retryable
