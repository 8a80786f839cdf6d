"""PgStore: the rules' ``AdminStore`` on one PostgreSQL transaction, plus the worker's extras.

The caller owns the transaction (``async with engine.begin() as conn``). Each
method is one statement, so the hot path costs one round trip per call: lock
the run, look up the proposal id, insert the state, update the run, record the
proposal. Objects returned are built from rows, never shared with a cache,
exactly like ``rules.memory.InMemoryStore`` returns copies.

Every statement goes through ``PgStore._execute``, the one place where database
and network exceptions become ``StoreError`` (retryable or not), so nothing
above this module knows about SQLAlchemy or asyncpg.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from rules.errors import StoreError
from rules.store import TagLimit
from schemas.runs import FlowRun, RunKind, TaskRun
from schemas.states import State, StateType
from worker.db import tables
from worker.db.errors import is_transient, translate_db_error

__all__ = ["PgStore", "ProcessedProposal", "is_transient", "translate_db_error"]


# --- rows <-> models --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessedProposal:
    """A proposal id already answered: its body's digest, the outcome it got and
    the messages its transaction published after commit."""

    body_sha256: str
    status: str
    outcome_json: str
    outbox_json: str = "[]"


@dataclass(frozen=True)
class _Kind:
    """The tables and model of one run kind."""

    run: sa.Table
    state: sa.Table
    state_run_id: sa.Column[Any]
    model: type[FlowRun] | type[TaskRun]
    fields: tuple[str, ...]  # run columns that are model fields, in table order


def _kind(run: sa.Table, state: sa.Table, model: type[FlowRun] | type[TaskRun]) -> _Kind:
    fields = tuple(c.name for c in run.columns if c.name not in ("state_id", "created"))
    missing = set(fields) - set(model.model_fields)
    if missing:
        raise TypeError(f"{run.name} columns without a {model.__name__} field: {missing}")
    return _Kind(run, state, state.c[f"{run.name}_id"], model, fields)


_KINDS: dict[RunKind, _Kind] = {
    "flow_run": _kind(tables.flow_run, tables.flow_run_state, FlowRun),
    "task_run": _kind(tables.task_run, tables.task_run_state, TaskRun),
}

_STATE_FIELDS = ("id", "type", "name", "timestamp", "message", "state_details", "data")
_STATE_PREFIX = "state__"


def _run_select(kind: _Kind) -> sa.Select[Any]:
    """The run's columns and its current state's, in one row (LEFT JOIN: a run may have none)."""
    state_columns = [kind.state.c[name].label(_STATE_PREFIX + name) for name in _STATE_FIELDS]
    return sa.select(*(kind.run.c[name] for name in kind.fields), *state_columns).select_from(
        kind.run.outerjoin(kind.state, kind.state.c.id == kind.run.c.state_id)
    )


_RUN_SELECTS = {kind: _run_select(k) for kind, k in _KINDS.items()}


def _state_from(row: RowMapping, prefix: str = "") -> State:
    return State.model_validate({name: row[prefix + name] for name in _STATE_FIELDS})


def _run_from(kind: _Kind, row: RowMapping) -> FlowRun | TaskRun:
    values = {name: row[name] for name in kind.fields}
    if row[_STATE_PREFIX + "id"] is not None:
        values["state"] = _state_from(row, _STATE_PREFIX)
    return kind.model.model_validate(values)


def _run_values(kind: _Kind, run: FlowRun | TaskRun) -> dict[str, Any]:
    """Column values of a run; JSON columns get JSON-native values (no sets, no UUIDs)."""
    values = {name: getattr(run, name) for name in kind.fields}
    values["tags"] = list(run.tags)
    values["empirical_policy"] = run.empirical_policy.model_dump(mode="json")
    values["state_type"] = run.state_type.value if run.state_type is not None else None
    values["state_id"] = run.state_id
    return values


def _state_values(kind: _Kind, run_id: uuid.UUID, state: State) -> dict[str, Any]:
    return {
        "id": state.id,
        kind.state_run_id.name: run_id,
        "type": state.type.value,
        "name": state.name,
        "timestamp": state.timestamp,
        "message": state.message,
        "state_details": state.state_details.model_dump(mode="json"),
        "data": state.data,
    }


def _has_nul(value: object) -> bool:
    """Whether a JSON-like value holds a NUL character, which PostgreSQL text and JSONB refuse."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


_COMPLETED = StateType.COMPLETED.value
_TAGS = sa.bindparam("tags", type_=ARRAY(sa.Text))

# --- the store --------------------------------------------------------------------------------


class PgStore:
    """``AdminStore`` and the worker's bookkeeping on one connection, in its caller's transaction.

    Not safe for concurrent use: one connection runs one statement at a time.
    """

    def __init__(self, connection: AsyncConnection) -> None:
        self._conn = connection

    async def _execute(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> CursorResult[Any]:
        """Run one statement; the single place library exceptions become ``StoreError``."""
        try:
            return await self._conn.execute(statement, params)
        except Exception as exc:
            error = translate_db_error(exc)
            if error is None:
                raise
            raise error from exc

    # -- runs ----------------------------------------------------------------------------------

    async def _read_run(
        self, kind: RunKind, run_id: uuid.UUID, *, lock: bool
    ) -> FlowRun | TaskRun | None:
        k = _KINDS[kind]
        if lock:
            # Lock first, read second. A joined `SELECT ... FOR UPDATE` that waited for the
            # lock re-checks only the run row; the state row committed meanwhile by the other
            # transaction is invisible to the statement's snapshot, so the join would return
            # a stale (or no) state and let two racing proposals both pass the rules.
            locked = sa.select(k.run.c.id).where(k.run.c.id == run_id).with_for_update()
            if (await self._execute(locked)).first() is None:
                return None
        statement = _RUN_SELECTS[kind].where(k.run.c.id == run_id)
        row = (await self._execute(statement)).mappings().first()
        return _run_from(k, row) if row is not None else None

    async def lock_run(self, kind: RunKind, run_id: uuid.UUID) -> FlowRun | TaskRun | None:
        """The run with its current state, locked until the transaction ends (two round trips).

        The lock serializes every proposal for this run across all workers.
        """
        return await self._read_run(kind, run_id, lock=True)

    async def read_flow_run(self, run_id: uuid.UUID) -> FlowRun | None:
        run = await self._read_run("flow_run", run_id, lock=False)
        assert run is None or isinstance(run, FlowRun)
        return run

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        run = await self._read_run("task_run", run_id, lock=False)
        assert run is None or isinstance(run, TaskRun)
        return run

    async def lock_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        run = await self._read_run("task_run", run_id, lock=True)
        assert run is None or isinstance(run, TaskRun)
        return run

    async def run_kind_of(self, run_id: uuid.UUID) -> RunKind | None:
        """Whether ``run_id`` names a flow run, a task run, or nothing (for ``kind_mismatch``)."""
        flows = sa.select(sa.literal("flow_run")).where(tables.flow_run.c.id == run_id)
        tasks = sa.select(sa.literal("task_run")).where(tables.task_run.c.id == run_id)
        found = (await self._execute(flows.union_all(tasks).limit(1))).scalar()
        if found == "flow_run":
            return "flow_run"
        if found == "task_run":
            return "task_run"
        return None

    async def create_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Insert a new run; an id already taken is a permanent ``StoreError``.

        A run handed in with a state gets that state as its first history entry,
        so the row never points at a missing state.
        """
        k = _KINDS[kind]
        await self._execute(sa.insert(k.run).values(_run_values(k, run)))
        if run.state is not None:
            await self.insert_state(kind, run, run.state)

    async def create_run_if_absent(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Insert the run unless its id exists: a run's first proposals may race on two workers.

        The loser waits for the winner's transaction and then inserts nothing; both
        go on to ``lock_run``.
        """
        k = _KINDS[kind]
        statement = (
            pg_insert(k.run)
            .values(_run_values(k, run))
            .on_conflict_do_nothing(index_elements=[k.run.c.id])
        )
        inserted = (await self._execute(statement)).rowcount
        if inserted and run.state is not None:
            await self.insert_state(kind, run, run.state)

    async def save_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Write every column of the run, the current state's id included (one UPDATE)."""
        k = _KINDS[kind]
        values = _run_values(k, run)
        del values["id"]
        statement = sa.update(k.run).where(k.run.c.id == run.id).values(values)
        if (await self._execute(statement)).rowcount == 0:
            # The in-memory store would insert; here it means the run was never created.
            raise StoreError(f"no {kind} {run.id} to save", retryable=False)

    # -- states --------------------------------------------------------------------------------

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        """Append ``state`` to the run's history.

        A NUL character is refused before the statement: PostgreSQL would refuse it
        too, but by then the whole transaction is aborted and the ABORT outcome the
        rules choose for an invalid state could not be recorded.
        """
        k = _KINDS[kind]
        values = _state_values(k, run.id, state)
        if _has_nul([values["name"], values["message"], values["state_details"], values["data"]]):
            raise StoreError("a state may not contain NUL characters", retryable=False)
        await self._execute(sa.insert(k.state).values(values))

    async def read_history(self, kind: RunKind, run_id: uuid.UUID) -> list[State]:
        """Every state of the run, in insertion order (oldest first)."""
        k = _KINDS[kind]
        statement = (
            sa.select(*(k.state.c[name] for name in _STATE_FIELDS))
            .where(k.state_run_id == run_id)
            .order_by(k.state.c.seq)
        )
        rows = (await self._execute(statement)).mappings().all()
        return [_state_from(row) for row in rows]

    async def flow_state_timestamp_taken(self, run_id: uuid.UUID, timestamp: dt.datetime) -> bool:
        s = tables.flow_run_state
        taken = sa.exists().where(s.c.flow_run_id == run_id, s.c.timestamp == timestamp)
        return bool((await self._execute(sa.select(taken))).scalar())

    # -- task cache ----------------------------------------------------------------------------

    async def find_cached_state(self, cache_key: str, now: dt.datetime) -> State | None:
        """The newest (by ``created``, then insertion) unexpired cache entry's COMPLETED state."""
        cache, s = tables.task_run_state_cache, tables.task_run_state
        statement = (
            sa.select(*(s.c[name] for name in _STATE_FIELDS))
            .select_from(cache.join(s, s.c.id == cache.c.task_run_state_id))
            .where(
                cache.c.cache_key == cache_key,
                sa.or_(cache.c.cache_expiration.is_(None), cache.c.cache_expiration > now),
                s.c.type == _COMPLETED,
            )
            .order_by(cache.c.created.desc(), cache.c.id.desc())
            .limit(1)
        )
        row = (await self._execute(statement)).mappings().first()
        return _state_from(row) if row is not None else None

    async def insert_cache_entry(
        self, cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        statement = sa.insert(tables.task_run_state_cache).values(
            cache_key=cache_key, cache_expiration=expiration, task_run_state_id=state_id
        )
        await self._execute(statement)

    # -- tag limits ----------------------------------------------------------------------------

    async def lock_tag_limits(self, tags: list[str]) -> list[TagLimit]:
        """Lock the limits in code-point order (``COLLATE "C"``, as Python sorts), whatever
        the database's collation, so two claimers always lock in the same order."""
        if not tags:
            return []
        c = tables.concurrency_limit
        statement = (
            sa.select(c.c.tag, c.c.concurrency_limit, c.c.active_slots)
            .where(c.c.tag == sa.any_(_TAGS))
            .order_by(c.c.tag.collate("C"))
            .with_for_update()
        )
        rows = await self._execute(statement, {"tags": sorted(set(tags))})
        return [_tag_limit(row) for row in rows.mappings()]

    async def save_tag_limit(self, limit: TagLimit) -> None:
        c = tables.concurrency_limit
        statement = (
            sa.update(c)
            .where(c.c.tag == limit.tag)
            .values(active_slots=list(limit.active_slots), updated=sa.func.now())
        )
        await self._execute(statement)

    async def upsert_tag_limit(self, tag: str, limit: int) -> None:
        """Create the limit or resize it; slots already held are kept."""
        c = tables.concurrency_limit
        insert = pg_insert(c).values(tag=tag, concurrency_limit=limit)
        statement = insert.on_conflict_do_update(
            index_elements=[c.c.tag],
            set_={"concurrency_limit": insert.excluded.concurrency_limit, "updated": sa.func.now()},
        )
        await self._execute(statement)

    async def delete_tag_limit(self, tag: str) -> bool:
        c = tables.concurrency_limit
        deleted = (await self._execute(sa.delete(c).where(c.c.tag == tag))).rowcount
        return bool(deleted)

    async def list_tag_limits(self) -> list[TagLimit]:
        c = tables.concurrency_limit
        statement = sa.select(c.c.tag, c.c.concurrency_limit, c.c.active_slots).order_by(
            c.c.tag.collate("C")
        )
        return [_tag_limit(row) for row in (await self._execute(statement)).mappings()]

    # -- processed proposals -------------------------------------------------------------------

    async def find_processed(self, proposal_id: uuid.UUID) -> ProcessedProposal | None:
        p = tables.processed_proposal
        statement = sa.select(
            p.c.body_sha256,
            p.c.status,
            sa.cast(p.c.outcome, sa.Text).label("outcome_json"),
            sa.cast(p.c.outbox, sa.Text).label("outbox_json"),
        ).where(p.c.proposal_id == proposal_id)
        row = (await self._execute(statement)).mappings().first()
        if row is None:
            return None
        return ProcessedProposal(
            body_sha256=row["body_sha256"],
            status=row["status"],
            outcome_json=row["outcome_json"],
            outbox_json=row["outbox_json"],
        )

    async def record_processed(
        self,
        proposal_id: uuid.UUID,
        body_sha256: str,
        run_kind: RunKind,
        run_id: uuid.UUID,
        status: str,
        outcome_json: str,
        outbox_json: str = "[]",
    ) -> None:
        """Remember the proposal's outcome and outbox (already JSON: the server parses
        each once).

        The same id recorded concurrently (one id used for two runs, so the run
        locks did not serialize them) is a retryable error: the retry finds this
        record and answers a replay or a ``proposal_id_conflict``.
        """
        p = tables.processed_proposal
        statement = (
            pg_insert(p)
            .values(
                proposal_id=proposal_id,
                body_sha256=body_sha256,
                run_kind=run_kind,
                run_id=run_id,
                status=status,
                outcome=sa.cast(sa.literal(outcome_json, sa.Text), JSONB),
                outbox=sa.cast(sa.literal(outbox_json, sa.Text), JSONB),
            )
            .on_conflict_do_nothing(index_elements=[p.c.proposal_id])
        )
        if (await self._execute(statement)).rowcount == 0:
            raise StoreError(f"proposal {proposal_id} was recorded concurrently", retryable=True)

    async def purge_processed(self, older_than: dt.datetime) -> int:
        """Forget proposals processed before ``older_than``; how many were removed."""
        p = tables.processed_proposal
        statement = sa.delete(p).where(p.c.processed_at < older_than)
        return (await self._execute(statement)).rowcount


def _tag_limit(row: RowMapping) -> TagLimit:
    return TagLimit(
        tag=row["tag"], limit=row["concurrency_limit"], active_slots=list(row["active_slots"])
    )
