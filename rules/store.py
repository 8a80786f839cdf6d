"""The store interface: everything orchestration reads or writes beyond the context.

Rules never see a database session. Production binds this Protocol to one
PostgreSQL transaction (``worker.db.store``); unit tests use ``rules.memory``.
Every method runs inside the caller's transaction, so a rolled-back transition
leaves no trace.

Deployment concurrency and V2 (global) limits are not built yet; they fit this shape
without changing what exists. Flow runs already carry ``deployment_id``. Deployment
slots would be one more locked read and write pair, like ``lock_tag_limits`` and
``save_tag_limit``, on a deployment limit row, plus lease reads and writes. V2 limits
would get their own methods and their own table (Prefect's ``concurrency_limit_v2``),
not new fields on ``TagLimit``. Their rules then take the places marked in
``rules.policies``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from schemas.runs import FlowRun, RunKind, TaskRun
from schemas.states import State


@dataclass
class TagLimit:
    """A V1 tag concurrency limit: at most ``limit`` task runs hold a slot at once."""

    tag: str
    limit: int
    active_slots: list[str] = field(default_factory=list)


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
