"""The store interface: everything orchestration reads or writes beyond the context.

Rules never see a database session. Production binds this Protocol to one
PostgreSQL transaction (``worker.db.store``); unit tests use ``rules.memory``.
Every method runs inside the caller's transaction, so a rolled-back transition
leaves no trace.

Global (V2) limits hold their slots under leases (``GlobalLimit.holders``): a slot is a
holder with an expiry, kept in the limit's own row, so the row lock that serialises the
claimers also makes ``active slots == leases`` true by construction, and an expired lease
is reclaimed by whoever next locks the row. A deployment's concurrency limit is the global
limit named ``deployment:<id>`` (``deployment_limit_name``), its holders flow runs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Literal, Protocol

from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import State


@dataclass
class TagLimit:
    """A V1 tag concurrency limit: at most ``limit`` task runs hold a slot at once.

    ``expires`` leases the slots: holder → when its slot frees itself unless the holder's
    transitions renew it. A holder without an entry (a slot taken before leases) keeps it
    until it leaves RUNNING."""

    tag: str
    limit: int
    active_slots: list[str] = field(default_factory=list)
    expires: dict[str, dt.datetime] = field(default_factory=dict)

    def copy(self) -> TagLimit:
        return TagLimit(self.tag, self.limit, list(self.active_slots), dict(self.expires))


@dataclass
class Lease:
    """A slot of a global limit held by a run until ``expires`` (renewed by its transitions).
    ``id`` names the lease where a state carries it (``deployment_concurrency_lease_id``)."""

    acquired: dt.datetime
    expires: dt.datetime
    id: uuid.UUID | None = None


@dataclass
class Deployment:
    """What orchestration needs of a deployment: its concurrency settings. A limit of None
    means no limit; the limit itself is the global limit ``deployment_limit_name(id)``."""

    id: uuid.UUID
    name: str = ""
    concurrency_limit: int | None = None
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"] = "ENQUEUE"
    grace_period_seconds: int | None = None


def deployment_limit_name(deployment_id: uuid.UUID) -> str:
    return f"deployment:{deployment_id}"


@dataclass
class GlobalLimit:
    """A named global (V2) concurrency limit, Prefect's ``concurrency_limit_v2``.

    ``holders`` maps a holder (a run id, as text) to its lease; the active slots are the
    holders. ``denied_slots`` counts refusals, decayed as Prefect decays them.
    ``avg_slot_occupancy_seconds`` is the moving average of how long a slot was held: it
    sets how long a refused task is told to wait. ``slot_decay_per_second`` > 0 makes it a
    rate limit: a slot then frees itself 1 / decay seconds after it was taken.
    """

    name: str
    limit: int
    active: bool = True
    holders: dict[str, Lease] = field(default_factory=dict)
    denied_slots: int = 0
    slot_decay_per_second: float = 0.0
    avg_slot_occupancy_seconds: float = 2.0
    updated: dt.datetime | None = None

    @property
    def active_slots(self) -> int:
        return len(self.holders)

    def copy(self) -> GlobalLimit:
        return GlobalLimit(
            self.name,
            self.limit,
            self.active,
            dict(self.holders),
            self.denied_slots,
            self.slot_decay_per_second,
            self.avg_slot_occupancy_seconds,
            self.updated,
        )


class Store(Protocol):
    """Reads and writes of one orchestration transaction."""

    async def read_flow_run(self, run_id: uuid.UUID) -> FlowRun | None:
        """The flow run with its current state, without a lock (a parent or a child)."""
        ...

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        """The task run with its current state, without a lock."""
        ...

    async def lock_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        """The task run, locked until the transaction ends (a subflow's parent task)."""
        ...

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        """Append ``state`` to the run's history; the run row is saved by ``save_run``."""
        ...

    async def save_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Persist the run's bookkeeping columns as rules left them."""
        ...

    async def flow_state_timestamp_taken(self, run_id: uuid.UUID, timestamp: dt.datetime) -> bool:
        """Whether the flow run already has a state with exactly this timestamp."""
        ...

    async def find_cached_state(self, cache_key: str, now: dt.datetime) -> State | None:
        """The newest unexpired COMPLETED state cached under ``cache_key``."""
        ...

    async def insert_cache_entry(
        self, cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        """Cache a validated state under ``cache_key`` until ``expiration`` (None: forever)."""
        ...

    async def lock_tag_limits(self, tags: list[str]) -> list[TagLimit]:
        """The limits of these tags, locked in tag order so concurrent claimers never deadlock."""
        ...

    async def save_tag_limit(self, limit: TagLimit) -> None:
        """Write back the active slots of a limit read by ``lock_tag_limits``."""
        ...

    async def read_deployment(self, deployment_id: uuid.UUID) -> Deployment | None:
        """The deployment, or None when the store knows none of this id."""
        ...

    async def lock_global_limits(self, names: list[str]) -> list[GlobalLimit]:
        """The global limits of these names, locked in name order (as ``lock_tag_limits``)."""
        ...

    async def save_global_limit(self, limit: GlobalLimit) -> None:
        """Write back the holders and counters of a limit read by ``lock_global_limits``."""
        ...


class AdminStore(Store, Protocol):
    """What the worker, the CLI and tests need beyond orchestration itself."""

    async def create_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Insert a new run without a state (its first proposal orchestrates from None)."""
        ...

    async def read_history(self, kind: RunKind, run_id: uuid.UUID) -> list[State]:
        """Every state of the run, oldest first."""
        ...

    async def upsert_tag_limit(self, tag: str, limit: int) -> None:
        """Create a limit or change its size, keeping the slots already held."""
        ...

    async def delete_tag_limit(self, tag: str) -> bool:
        """Remove a limit; False when there was none."""
        ...

    async def list_tag_limits(self) -> list[TagLimit]:
        """Every limit, by tag."""
        ...

    async def upsert_global_limit(
        self, name: str, limit: int, *, active: bool = True, slot_decay_per_second: float = 0.0
    ) -> None:
        """Create a global limit or change its settings, keeping the leases already held."""
        ...

    async def delete_global_limit(self, name: str) -> bool:
        """Remove a global limit; False when there was none."""
        ...

    async def upsert_deployment(self, deployment: Deployment) -> None:
        """Create or change a deployment, and its ``deployment:<id>`` limit to match (kept
        holders and all; removed when the deployment has no limit any more)."""
        ...

    async def delete_deployment(self, deployment_id: uuid.UUID) -> bool:
        """Remove a deployment and its limit; False when there was none."""
        ...

    async def list_deployments(self) -> list[Deployment]:
        """Every deployment, by name then id."""
        ...

    async def list_global_limits(self) -> list[GlobalLimit]:
        """Every global limit, by name."""
        ...
