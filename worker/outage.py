"""A database outage: how the worker tells one from a fault of its own, and holds its
proposals through it instead of spending their delivery attempts."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:  # metrics imports the health checks, which use this module
    from arbiter.worker.metrics import WorkerMetrics

__all__ = ["database_answers", "hold_until_database_answers"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
FIRST_PROBE_S = 0.5
MAX_PROBE_S = 5.0


async def database_answers(engine: AsyncEngine, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a trivial query succeeds now. A dead pooled connection fails it once and
    is invalidated with the rest of the pool, so the next probe gets a new one."""
    try:
        async with asyncio.timeout(timeout_s), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


async def hold_until_database_answers(
    engine: AsyncEngine, metrics: WorkerMetrics, held: int
) -> None:
    """Probe the database with capped backoff until it answers, counting ``held``
    proposals as held meanwhile (readiness reports them).

    Other batches do the same, and the prefetch window stops the broker from sending
    more, so the worker idles through the outage. SIGTERM still ends it after
    ARBITER_SHUTDOWN_TIMEOUT_S; the held deliveries are then redelivered.
    """
    log.warning("the database is unreachable; holding %d proposals", held)
    delay = FIRST_PROBE_S
    metrics.held.inc(held)
    try:
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_PROBE_S)
            if await database_answers(engine):
                return
    finally:
        metrics.held.dec(held)
