"""BatchStore: the rules' ``Store`` for many proposals in one transaction.

A batch locks every run it touches up front (``worker.batch``), so the rules run in
memory against this overlay: runs, new states, cache entries and tag limits written by
one proposal are seen by the next, and nothing is sent to PostgreSQL until ``flush``
writes it all in one statement (new runs included). Reads the overlay cannot answer
(a parent flow run, a cache entry written by another transaction, a flow state's
timestamp) go to the wrapped ``PgStore`` in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from arbiter.rules.errors import StoreError
from arbiter.rules.store import Deployment, GlobalLimit, TagLimit
from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import State, StateType
from arbiter.worker.db import statements as sql
from arbiter.worker.db.global_limits import save_many
from arbiter.worker.db.rows import run_values, slot_expires_json, state_values
from arbiter.worker.db.storable import unstorable
from arbiter.worker.db.store import BatchRows, PgStore

__all__ = ["BatchStore", "RunKey"]

RunKey = tuple[RunKind, uuid.UUID]
_KINDS: tuple[RunKind, RunKind] = ("flow_run", "task_run")


@dataclass
class _CacheEntry:
    cache_key: str
    expiration: dt.datetime | None
    state_id: uuid.UUID


@dataclass
class _Pending:
    """Everything the batch will write at ``flush``, in the order it was written."""

    states: dict[RunKind, list[dict[str, Any]]] = field(
        default_factory=lambda: {"flow_run": [], "task_run": []}
    )
    runs: dict[RunKey, FlowRun | TaskRun] = field(default_factory=dict)
    cache: list[_CacheEntry] = field(default_factory=list)
    limits: dict[str, TagLimit] = field(default_factory=dict)
    global_limits: dict[str, GlobalLimit] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)  # JSON objects, ready to send


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


def _interval(value: dt.timedelta) -> str:
    return f"{value.total_seconds()} seconds"


# Values ``jsonb_populate_recordset`` would misread, by exact type (a dict lookup per value
# is the cheapest test: the flush serialises every column of every row of a batch).
_CONVERT: dict[type, Any] = {dt.datetime: _utc, dt.timedelta: _interval}


def _row(values: dict[str, Any]) -> str:
    """One row as the JSON object ``jsonb_populate_recordset`` reads: an interval as text,
    and times in UTC (PostgreSQL reads offsets up to 15:59 only; Python allows 23:59)."""
    row = {
        name: value if (convert := _CONVERT.get(type(value))) is None else convert(value)
        for name, value in values.items()
    }
    return pydantic_core.to_json(row).decode()


class BatchStore:
    """An in-memory overlay on one transaction's ``PgStore``; see the module docstring.

    ``runs`` holds the batch's locked runs, latest version first-class: the worker hands
    them to the orchestrator itself (no copy), and ``save_run`` puts the new version back.
    """

    def __init__(
        self,
        db: PgStore,
        runs: dict[RunKey, FlowRun | TaskRun],
        new: dict[RunKey, int] | None = None,
    ) -> None:
        self.db = db
        self.runs = runs
        # Runs of ``runs`` to insert at ``flush`` (not update), with the index of the
        # proposal that creates each.
        self.new = new or {}
        self._reads: dict[RunKey, FlowRun | TaskRun | None] = {}
        self._states: dict[uuid.UUID, dict[str, Any]] = {}  # column values, by state id
        self._flow_timestamps: dict[uuid.UUID, set[dt.datetime]] = {}
        self._limits: dict[str, TagLimit | None] = {}
        self._global_limits: dict[str, GlobalLimit | None] = {}
        # Tags whose limits this batch freed a slot of: their parked waiters are woken.
        self.freed_tags: set[str] = set()
        self._deployments: dict[uuid.UUID, Deployment | None] = {}
        self.pending = _Pending()

    # -- runs ----------------------------------------------------------------------------------

    def remember(self, kind: RunKind, run: FlowRun | TaskRun | None, run_id: uuid.UUID) -> None:
        """An unlocked read made for the whole batch (a task's flow run, read up front)."""
        self._reads[(kind, run_id)] = run

    async def _read(self, kind: RunKind, run_id: uuid.UUID) -> FlowRun | TaskRun | None:
        key = (kind, run_id)
        if key in self.runs:
            return self.runs[key].model_copy(deep=True)
        if key not in self._reads:
            self._reads[key] = await (
                self.db.read_flow_run(run_id)
                if kind == "flow_run"
                else self.db.read_task_run(run_id)
            )
        found = self._reads[key]
        return found.model_copy(deep=True) if found is not None else None

    async def read_flow_run(self, run_id: uuid.UUID) -> FlowRun | None:
        run = await self._read("flow_run", run_id)
        assert run is None or isinstance(run, FlowRun)
        return run

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        run = await self._read("task_run", run_id)
        assert run is None or isinstance(run, TaskRun)
        return run

    async def lock_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        key: RunKey = ("task_run", run_id)
        if key not in self.runs:
            locked = await self.db.lock_task_run(run_id)
            if locked is None:
                return None
            self.runs[key] = locked
            self._reads.pop(key, None)
        run = self.runs[key]
        assert isinstance(run, TaskRun)
        return run.model_copy(deep=True)

    async def save_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        key = (kind, run.id)
        self.runs[key] = run
        self._reads.pop(key, None)
        self.pending.runs[key] = run

    # -- states --------------------------------------------------------------------------------

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        values = state_values(sql.KINDS[kind], run.id, state)
        refused = unstorable(
            [values["name"], values["message"], values["state_details"], values["data"]]
        )
        if refused is not None:
            raise StoreError(f"a state cannot be stored: {refused}", retryable=False)
        self.pending.states[kind].append(values)
        self._states[state.id] = values
        if kind == "flow_run":
            self._flow_timestamps.setdefault(run.id, set()).add(state.timestamp)

    async def flow_state_timestamp_taken(self, run_id: uuid.UUID, timestamp: dt.datetime) -> bool:
        if timestamp in self._flow_timestamps.get(run_id, ()):
            return True
        return await self.db.flow_state_timestamp_taken(run_id, timestamp)

    # -- task cache ----------------------------------------------------------------------------

    async def find_cached_state(self, cache_key: str, now: dt.datetime) -> State | None:
        # Entries written in this batch are the newest; the last one written wins.
        for entry in reversed(self.pending.cache):
            live = entry.expiration is None or entry.expiration > now
            values = self._states.get(entry.state_id)
            if entry.cache_key != cache_key or not live or values is None:
                continue
            if values["type"] == StateType.COMPLETED.value:
                # Built from the values written, as a read from the table would be.
                return State.model_validate({name: values[name] for name in sql.STATE_FIELDS})
        return await self.db.find_cached_state(cache_key, now)

    async def insert_cache_entry(
        self, cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        self.pending.cache.append(_CacheEntry(cache_key, expiration, state_id))

    # -- tag limits ----------------------------------------------------------------------------

    async def lock_tag_limits(self, tags: list[str]) -> list[TagLimit]:
        wanted = sorted(set(tags))
        missing = [tag for tag in wanted if tag not in self._limits]
        if missing:
            found = {limit.tag: limit for limit in await self.db.lock_tag_limits(missing)}
            for tag in missing:
                self._limits[tag] = found.get(tag)
        return [limit.copy() for tag in wanted if (limit := self._limits[tag]) is not None]

    async def save_tag_limit(self, limit: TagLimit) -> None:
        saved = limit.copy()
        before = self._limits.get(limit.tag)
        if before is not None and len(saved.active_slots) < len(before.active_slots):
            self.freed_tags.add(limit.tag)
        self._limits[limit.tag] = saved
        self.pending.limits[limit.tag] = saved

    # -- global limits (locked at first use, held to the end of the transaction) -------------

    async def lock_global_limits(self, names: list[str]) -> list[GlobalLimit]:
        wanted = sorted(set(names))
        missing = [name for name in wanted if name not in self._global_limits]
        if missing:
            found = {limit.name: limit for limit in await self.db.lock_global_limits(missing)}
            for name in missing:
                self._global_limits[name] = found.get(name)
        return [limit.copy() for name in wanted if (limit := self._global_limits[name]) is not None]

    async def read_deployment(self, deployment_id: uuid.UUID) -> Deployment | None:
        if deployment_id not in self._deployments:
            self._deployments[deployment_id] = await self.db.read_deployment(deployment_id)
        return self._deployments[deployment_id]

    async def save_global_limit(self, limit: GlobalLimit) -> None:
        saved = limit.copy()
        before = self._global_limits.get(limit.name)
        freed = before is not None and saved.active_slots < before.active_slots
        if freed and limit.name.startswith("tag:"):
            self.freed_tags.add(limit.name.removeprefix("tag:"))
        self._global_limits[limit.name] = saved
        self.pending.global_limits[limit.name] = saved

    # -- writing it all ------------------------------------------------------------------------

    def record(
        self,
        proposal_id: uuid.UUID,
        body_sha256: str,
        run_key: RunKey,
        status: str,
        outcome_json: str,
        outbox_json: str,
    ) -> None:
        """A processed proposal's record; its outcome and outbox are JSON already."""
        kind, run_id = run_key
        self.pending.records.append(
            f'{{"proposal_id":"{proposal_id}","body_sha256":"{body_sha256}",'
            f'"run_kind":"{kind}","run_id":"{run_id}","status":"{status}",'
            f'"outcome":{outcome_json},"outbox":{outbox_json}}}'
        )

    async def flush(self) -> None:
        """Every pending write, in one statement; the caller commits."""
        pending = self.pending
        rows = BatchRows()
        for kind in _KINDS:
            new = [
                _row(run_values(sql.KINDS[kind], run))
                for key, run in self.runs.items()
                if key[0] == kind and key in self.new
            ]
            saved = [
                _row(run_values(sql.KINDS[kind], run))
                for key, run in pending.runs.items()
                if key[0] == kind and key not in self.new
            ]
            rows.json[f"{kind}_new"] = new
            rows.json[f"{kind}_saved"] = saved
            rows.json[f"{kind}_states"] = [_row(values) for values in pending.states[kind]]
            rows.expected[f"{kind}_new"] = len(new)
            rows.expected[f"{kind}_saved"] = len(saved)
        rows.json["cache"] = [
            _row(
                {
                    "cache_key": e.cache_key,
                    "cache_expiration": e.expiration,
                    "task_run_state_id": e.state_id,
                }
            )
            for e in pending.cache
        ]
        rows.json["limits"] = [
            _row(
                {
                    "tag": limit.tag,
                    "active_slots": list(limit.active_slots),
                    "slot_expires": slot_expires_json(limit),
                }
            )
            for limit in pending.limits.values()
        ]
        rows.json["records"] = pending.records
        rows.expected["recorded"] = len(pending.records)
        await self.db.write_batch(rows)
        # Only batches that touched a global limit pay for this statement.
        await save_many(self.db, list(pending.global_limits.values()))
        self.pending = _Pending()
        self.new = {}
