"""Global (V2) limits in PostgreSQL: the row lock, the writes, and the administration.

A limit's leases live in its own row (``holders``, JSONB: holder → ``{"acquired",
"expires"}``), so locking the row serialises every claimer and releaser of the limit,
and writing it back writes the slots and the leases at once. Mixed into ``PgStore``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from arbiter.rules.store import GlobalLimit, Lease
from arbiter.worker.db import tables

__all__ = ["EXPIRED_LEASES", "GlobalLimitRows", "limit_from", "save_many"]

_T = tables.concurrency_limit_v2.name
_COLUMNS = (
    "name, concurrency_limit, active, holders::text AS holders, denied_slots,"
    " slot_decay_per_second, avg_slot_occupancy_seconds, updated"
)

# Locked in code-point order, as Python sorts (see PgStore.lock_tag_limits).
LOCK = f"""
SELECT {_COLUMNS} FROM {_T}
WHERE name = ANY($1::text[]) ORDER BY name COLLATE "C" FOR UPDATE
"""

# Only what the rules change: the limit's size and switches belong to the administrator.
SAVE = f"""
UPDATE {_T} AS t
SET holders = s.holders::jsonb, denied_slots = s.denied_slots,
    avg_slot_occupancy_seconds = s.avg, updated = s.updated
FROM unnest($1::text[], $2::text[], $3::int[], $4::float8[], $5::timestamptz[])
    AS s(name, holders, denied_slots, avg, updated)
WHERE t.name = s.name
RETURNING t.name
"""

UPSERT = f"""
INSERT INTO {_T} (name, concurrency_limit, active, slot_decay_per_second)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET concurrency_limit = excluded.concurrency_limit,
    active = excluded.active, slot_decay_per_second = excluded.slot_decay_per_second,
    updated = now()
RETURNING name
"""

DELETE = f"DELETE FROM {_T} WHERE name = $1 RETURNING name"

LIST = f'SELECT {_COLUMNS} FROM {_T} ORDER BY name COLLATE "C"'

# The sweep's claim: limits holding a lease expired by $1, skipping rows another worker
# holds (that worker reclaims them itself), $2 at most.
EXPIRED_LEASES = f"""
SELECT {_COLUMNS} FROM {_T} AS t
WHERE EXISTS (
    SELECT 1 FROM jsonb_each(t.holders) AS h WHERE (h.value->>'expires')::timestamptz <= $1
)
ORDER BY name COLLATE "C" LIMIT $2 FOR UPDATE SKIP LOCKED
"""


def _holders_json(limit: GlobalLimit) -> str:
    return json.dumps(
        {
            holder: {
                "acquired": lease.acquired.isoformat(),
                "expires": lease.expires.isoformat(),
                "id": str(lease.id) if lease.id is not None else None,
            }
            for holder, lease in limit.holders.items()
        }
    )


def limit_from(record: Any) -> GlobalLimit:
    """From an asyncpg record (the worker's transactions) or a SQLAlchemy row (the CLI)."""
    row = getattr(record, "_mapping", record)
    holders = {
        holder: Lease(
            dt.datetime.fromisoformat(lease["acquired"]),
            dt.datetime.fromisoformat(lease["expires"]),
            uuid.UUID(lease["id"]) if lease.get("id") else None,
        )
        for holder, lease in json.loads(row["holders"]).items()
    }
    return GlobalLimit(
        name=row["name"],
        limit=row["concurrency_limit"],
        active=row["active"],
        holders=holders,
        denied_slots=row["denied_slots"],
        slot_decay_per_second=row["slot_decay_per_second"],
        avg_slot_occupancy_seconds=row["avg_slot_occupancy_seconds"],
        updated=row["updated"],
    )


class _Fetcher(Protocol):
    async def fetch_rows(self, query: str, *args: Any) -> Sequence[Any]: ...


async def save_many(db: _Fetcher, limits: Sequence[GlobalLimit]) -> None:
    """Write back the holders and counters of limits locked in this transaction."""
    if not limits:
        return
    now = dt.datetime.now(dt.UTC)
    await db.fetch_rows(
        SAVE,
        [limit.name for limit in limits],
        [_holders_json(limit) for limit in limits],
        [limit.denied_slots for limit in limits],
        [limit.avg_slot_occupancy_seconds for limit in limits],
        [limit.updated or now for limit in limits],
    )


class GlobalLimitRows:
    """``PgStore``'s global-limit methods (the ``rules.store`` protocols)."""

    async def lock_global_limits(self: _Fetcher, names: list[str]) -> list[GlobalLimit]:
        if not names:
            return []
        return [limit_from(row) for row in await self.fetch_rows(LOCK, sorted(set(names)))]

    async def save_global_limit(self: _Fetcher, limit: GlobalLimit) -> None:
        await save_many(self, [limit])

    async def upsert_global_limit(
        self: _Fetcher,
        name: str,
        limit: int,
        *,
        active: bool = True,
        slot_decay_per_second: float = 0.0,
    ) -> None:
        await self.fetch_rows(UPSERT, name, limit, active, slot_decay_per_second)

    async def delete_global_limit(self: _Fetcher, name: str) -> bool:
        return bool(await self.fetch_rows(DELETE, name))

    async def list_global_limits(self: _Fetcher) -> list[GlobalLimit]:
        return [limit_from(row) for row in await self.fetch_rows(LIST)]
