"""Global (V2) concurrency limits as task tags use them: ``tag:<tag>`` limits, leased slots.

A run holds a slot of a global limit while it is one of the limit's ``holders``, under a
lease that expires ``settings.slot_lease_ttl_s`` after it was taken or last renewed (its
own accepted transitions renew it). Every rule that touches a limit first locks its row
and reclaims the leases that expired there, so a holder that vanished (its executor died
and never proposes again) loses its slot to the next claimer within the TTL; the sweeps
reclaim it as well when nobody claims. The slots are the holders, so ``active slots ==
live leases`` holds after every transaction.

Prefect's arithmetic is kept where it still means something: refusals count as
``denied_slots`` and decay as Prefect decays them, a refused task waits about the
average time a slot is held (``avg_slot_occupancy_seconds``, capped by the tag wait
setting, with Poisson jitter), and a release moves that average. A limit with
``slot_decay_per_second`` > 0 is a rate limit: its leases last at most 1 / decay seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid

from arbiter.rules.core.jitter import clamped_poisson_interval
from arbiter.rules.store import GlobalLimit, Lease

TAG_PREFIX = "tag:"

__all__ = [
    "TAG_PREFIX",
    "claim",
    "deny",
    "has_room",
    "holder_of",
    "reclaim_expired",
    "release",
    "renew",
    "tag_of",
    "wait_seconds",
]


def tag_of(limit: GlobalLimit) -> str:
    return limit.name.removeprefix(TAG_PREFIX)


def reclaim_expired(limit: GlobalLimit, now: dt.datetime) -> bool:
    """Drop the leases that expired by ``now``; whether any did."""
    expired = [holder for holder, lease in limit.holders.items() if lease.expires <= now]
    for holder in expired:
        del limit.holders[holder]
    return bool(expired)


def _lease_seconds(limit: GlobalLimit, ttl_s: float) -> float:
    if limit.slot_decay_per_second > 0:
        return min(ttl_s, 1 / limit.slot_decay_per_second)
    return ttl_s


def holder_of(limit: GlobalLimit, lease_id: uuid.UUID) -> str | None:
    """Who holds the lease named ``lease_id`` on this limit, if it is still held."""
    for holder, lease in limit.holders.items():
        if lease.id == lease_id:
            return holder
    return None


def has_room(limit: GlobalLimit, holder: str) -> bool:
    """A holder that already holds a slot keeps it (a restart does not count twice)."""
    return holder in limit.holders or limit.active_slots < limit.limit


def claim(
    limit: GlobalLimit,
    holder: str,
    now: dt.datetime,
    ttl_s: float,
    lease_id: uuid.UUID | None = None,
) -> bool:
    """Take (or renew) ``holder``'s slot; whether it is newly taken."""
    expires = now + dt.timedelta(seconds=_lease_seconds(limit, ttl_s))
    held = limit.holders.get(holder)
    if held is not None:
        limit.holders[holder] = Lease(held.acquired, expires, held.id)
        return False
    limit.holders[holder] = Lease(now, expires, lease_id)
    limit.updated = now
    return True


def renew(limit: GlobalLimit, holder: str, now: dt.datetime, ttl_s: float) -> bool:
    """Push back the expiry of ``holder``'s lease, if it holds one; whether it did."""
    if holder not in limit.holders:
        return False
    claim(limit, holder, now, ttl_s)
    return True


def release(limit: GlobalLimit, holder: str, now: dt.datetime) -> bool:
    """Free ``holder``'s slot and fold how long it was held into the average; whether it
    held one."""
    lease = limit.holders.pop(holder, None)
    if lease is None:
        return False
    occupancy = max((now - lease.acquired).total_seconds(), 0.0)
    # Prefect's moving average: a step of 1 / (2 * limit) toward the latest occupancy.
    step = 1 / (2 * max(limit.limit, 1))
    average = limit.avg_slot_occupancy_seconds
    limit.avg_slot_occupancy_seconds = average + (occupancy - average) * step
    limit.updated = now
    return True


def _denied_decay_per_second(limit: GlobalLimit, max_wait_s: float) -> float:
    if limit.slot_decay_per_second > 0:
        return limit.slot_decay_per_second
    return 1 / min(max(limit.avg_slot_occupancy_seconds, 0.1), max(max_wait_s, 0.1))


def deny(limit: GlobalLimit, now: dt.datetime, max_wait_s: float) -> None:
    """Count one refusal, after decaying the earlier ones as Prefect does."""
    if limit.updated is not None and limit.denied_slots:
        elapsed = max((now - limit.updated).total_seconds(), 0.0)
        decayed = math.floor(_denied_decay_per_second(limit, max_wait_s) * elapsed)
        limit.denied_slots = max(limit.denied_slots - decayed, 0)
    limit.denied_slots += 1
    limit.updated = now


def blocking(limits: list[GlobalLimit]) -> GlobalLimit:
    """The fullest limit: the one whose slots the waiter most likely waits for."""
    return max(limits, key=lambda limit: limit.active_slots / max(limit.limit, 1))


def wait_seconds(limit: GlobalLimit, max_wait_s: float) -> int:
    """About as long as a slot of ``limit`` is held, capped at ``max_wait_s``, jittered
    (Prefect's delay for a refused V2 tag slot). At least 1 s."""
    average = min(limit.avg_slot_occupancy_seconds or max_wait_s, max_wait_s)
    if average <= 0:
        return 1
    return max(round(clamped_poisson_interval(average)), 1)
