"""Forgetting processed proposal ids past the retention window (``ARBITER_RETENTION_DAYS``):
any worker may purge, and two at once delete each row once."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.worker.db.store import PgStore
from arbiter.worker.passes import Passes
from arbiter.worker.unit_of_work import purge_cutoff

__all__ = ["PURGE_INTERVAL_S", "purge_forever", "purge_processed"]

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0


async def purge_processed(
    engine: AsyncEngine, clock: Callable[[], dt.datetime], retention_days: float
) -> int:
    """One purge; a failure is logged (the next one tries again) and counts 0."""
    try:
        async with engine.begin() as conn:
            cutoff = purge_cutoff(clock(), retention_days)
            removed = await PgStore(conn).purge_processed(cutoff)
    except Exception:
        log.exception("purging processed proposals failed; will try again")
        return 0
    if removed:
        log.info("purged %d processed proposal ids older than %s", removed, cutoff)
    return removed


async def purge_forever(
    engine: AsyncEngine,
    clock: Callable[[], dt.datetime],
    retention_days: float,
    passes: Passes,
) -> None:
    """A purge every ten minutes (for a worker that runs no sweeper, which purges too)."""
    while not passes.stopping:
        async with passes.one():
            await purge_processed(engine, clock, retention_days)
        await asyncio.sleep(PURGE_INTERVAL_S)
