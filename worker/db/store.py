"""PgStore: the rules' ``AdminStore`` on one PostgreSQL transaction, plus the worker's extras.

The caller owns the transaction (``async with engine.begin() as conn``). The worker's
hot path reads and writes through it in bulk: a batch locks, reads and creates its
runs and reads its replay records with a statement per table (``lock_runs``,
``read_runs``, ``insert_runs_if_absent``, ``find_processed_many``), and its
``BatchStore`` overlay writes everything at the end (``execute_many``, ``record_many``).
The single-row methods serve the rules' reads the overlay cannot answer, the CLI and
tests. Statements are built once, in ``worker.db.statements``. Objects returned are
built from rows, never shared with a cache, exactly like ``rules.memory.InMemoryStore``
returns copies.

Every statement goes through ``PgStore._execute``, the one place where database
and network exceptions become ``StoreError`` (retryable or not), so nothing
above this module knows about SQLAlchemy or asyncpg.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from arbiter.rules.errors import StoreError
from arbiter.rules.store import TagLimit
from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import State
from arbiter.worker.db import statements as sql
from arbiter.worker.db import tables
from arbiter.worker.db.batch_rows import BatchRead, BatchRows, ProcessedProposal
from arbiter.worker.db.deployments import DeploymentRows
from arbiter.worker.db.errors import is_transient, translate_db_error
from arbiter.worker.db.global_limits import GlobalLimitRows
from arbiter.worker.db.rows import (
    processed_from,
    run_from,
    run_values,
    slot_expires_json,
    state_from,
    state_values,
    tag_limit_from,
)
from arbiter.worker.db.storable import unstorable

__all__ = [
    "BatchRead",
    "BatchRows",
    "PgStore",
    "ProcessedProposal",
    "is_transient",
    "translate_db_error",
]


# --- the store --------------------------------------------------------------------------------


class PgStore(GlobalLimitRows, DeploymentRows):
    """``AdminStore`` and the worker's bookkeeping on one connection, in its caller's transaction.

    Not safe for concurrent use: one connection runs one statement at a time.
    """

    def __init__(
        self, connection: AsyncConnection, *, driver: asyncpg.Connection | None = None
    ) -> None:
        self._conn = connection
        self._driver = driver  # the asyncpg connection under ``connection``, once known
        self.statements = 0  # sent so far: the figure benchmarks divide by proposals

    async def _fetch(self, query: str, *args: Any) -> Sequence[Any]:
        """A hot-path statement straight on the asyncpg connection, in the caller's
        transaction: asyncpg prepares and caches it, and no SQLAlchemy compile, cursor or
        result object stands between (profiled at about a fifth of a batch's CPU). Errors
        become ``StoreError`` exactly as in ``_execute``; a connection the failure closed
        is invalidated so the pool does not hand it out again."""
        self.statements += 1
        try:
            if self._driver is None:
                raw = await self._conn.get_raw_connection()
                self._driver = raw.driver_connection
            assert self._driver is not None
            if self._conn.in_transaction() and not self._driver.is_in_transaction():
                # SQLAlchemy sends its BEGIN lazily, with its first statement: let this
                # one go through it, so that the transaction the caller opened is real.
                result = await self._conn.exec_driver_sql(query, args)
                return result.all()
            return await self._driver.fetch(query, *args)
        except Exception as exc:
            if self._driver is not None and (
                self._driver.is_closed() or isinstance(exc, asyncpg.InternalClientError)
            ):
                # Gone, or its protocol state lost (a backend terminated while the
                # connection sat idle in the transaction): retry on a new connection.
                await self._conn.invalidate(exc)
                raise StoreError(f"database connection lost: {exc!r}", retryable=True) from exc
            error = translate_db_error(exc)
            if error is None:
                raise
            raise error from exc

    async def _execute(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> CursorResult[Any]:
        """The single place library exceptions become ``StoreError``."""
        self.statements += 1
        try:
            return await self._conn.execute(statement, params)
        except Exception as exc:
            error = translate_db_error(exc)
            if error is None:
                raise
            raise error from exc

    async def _save_run_now(self, kind: RunKind, run_id: uuid.UUID, values: dict[str, Any]) -> None:
        params = {**values, "run_key": run_id}
        if (await self._execute(sql.BY_KIND[kind]["update"], params)).rowcount == 0:
            # The in-memory store would insert; here it means the run was never created.
            raise StoreError(f"no {kind} {run_id} to save", retryable=False)

    # -- runs ----------------------------------------------------------------------------------

    async def _read_run(
        self, kind: RunKind, run_id: uuid.UUID, *, lock: bool
    ) -> FlowRun | TaskRun | None:
        k = sql.KINDS[kind]
        params = {"run_id": run_id}
        if lock:
            row = await self._locked_row(kind, params)
        else:
            row = (await self._execute(sql.BY_KIND[kind]["read"], params)).mappings().first()
        return run_from(k, row) if row is not None else None

    async def _locked_row(self, kind: RunKind, params: dict[str, Any]) -> RowMapping | None:
        # One round trip: lock the run row and read it joined with its current state. If the
        # lock had to wait, the run row is re-read at its newest version but the joined state
        # row comes from the statement's older snapshot; the two state ids then differ (or the
        # row is missing), and a second, plain read (a new snapshot, lock held) gets it right.
        chosen = sql.BY_KIND[kind]
        row = (await self._execute(chosen["locked_read"], params)).mappings().first()
        if row is not None and row[sql.CURRENT_STATE_ID] == row[sql.STATE_PREFIX + "id"]:
            return row
        if row is None and (await self._execute(chosen["lock"], params)).first() is None:
            return None
        return (await self._execute(chosen["read"], params)).mappings().first()

    async def lock_run(self, kind: RunKind, run_id: uuid.UUID) -> FlowRun | TaskRun | None:
        """The run with its current state, locked until the transaction ends (one round trip
        unless another transaction held the lock).

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
        found = (await self._execute(sql.RUN_KIND_OF, {"run_id": run_id})).scalar()
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
        k = sql.KINDS[kind]
        await self._execute(sa.insert(k.run).values(run_values(k, run)))
        if run.state is not None:
            await self.insert_state(kind, run, run.state)

    async def save_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        """Write every column of the run, the current state's id included (one UPDATE)."""
        values = run_values(sql.KINDS[kind], run)
        del values["id"]
        await self._save_run_now(kind, run.id, values)

    # -- states --------------------------------------------------------------------------------

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        """Append ``state`` to the run's history.

        A NUL character is refused before the statement: PostgreSQL would refuse it
        too, but by then the whole transaction is aborted and the ABORT outcome the
        rules choose for an invalid state could not be recorded.
        """
        k = sql.KINDS[kind]
        values = state_values(k, run.id, state)
        refused = unstorable(
            [values["name"], values["message"], values["state_details"], values["data"]]
        )
        if refused is not None:
            raise StoreError(f"a state cannot be stored: {refused}", retryable=False)
        await self._execute(sql.BY_KIND[kind]["insert_state"], values)

    async def read_history(self, kind: RunKind, run_id: uuid.UUID) -> list[State]:
        """Every state of the run, in insertion order (oldest first)."""
        k = sql.KINDS[kind]
        statement = (
            sa.select(*(k.state.c[name] for name in sql.STATE_FIELDS))
            .where(k.state_run_id == run_id)
            .order_by(k.state.c.seq)
        )
        rows = (await self._execute(statement)).mappings().all()
        return [state_from(row) for row in rows]

    async def flow_state_timestamp_taken(self, run_id: uuid.UUID, timestamp: dt.datetime) -> bool:
        params = {"run_id": run_id, "timestamp": timestamp}
        return bool((await self._execute(sql.FLOW_TIMESTAMP_TAKEN, params)).scalar())

    # -- task cache ----------------------------------------------------------------------------

    async def find_cached_state(self, cache_key: str, now: dt.datetime) -> State | None:
        """The newest (by ``created``, then insertion) unexpired cache entry's COMPLETED state."""
        params = {"cache_key": cache_key, "now": now}
        row = (await self._execute(sql.FIND_CACHED, params)).mappings().first()
        return state_from(row) if row is not None else None

    async def insert_cache_entry(
        self, cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        values = {
            "cache_key": cache_key,
            "cache_expiration": expiration,
            "task_run_state_id": state_id,
        }
        await self._execute(sql.INSERT_CACHE_ENTRY, values)

    # -- tag limits ----------------------------------------------------------------------------

    async def lock_tag_limits(self, tags: list[str]) -> list[TagLimit]:
        """Lock the limits in code-point order (``COLLATE "C"``, as Python sorts), whatever
        the database's collation, so two claimers always lock in the same order."""
        if not tags:
            return []
        rows = await self._fetch(sql.LOCK_TAG_LIMITS_SQL, sorted(set(tags)))
        return [tag_limit_from(row) for row in rows]

    async def save_tag_limit(self, limit: TagLimit) -> None:
        params = {
            "limit_tag": limit.tag,
            "active_slots": list(limit.active_slots),
            "slot_expires": slot_expires_json(limit),
        }
        await self._execute(sql.SAVE_TAG_LIMIT, params)

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
        statement = sa.select(
            c.c.tag, c.c.concurrency_limit, c.c.active_slots, c.c.slot_expires
        ).order_by(c.c.tag.collate("C"))
        return [tag_limit_from(row) for row in (await self._execute(statement)).mappings()]

    # -- processed proposals -------------------------------------------------------------------

    async def find_processed(self, proposal_id: uuid.UUID) -> ProcessedProposal | None:
        params = {"proposal_id": proposal_id}
        row = (await self._execute(sql.FIND_PROCESSED, params)).mappings().first()
        return processed_from(row) if row is not None else None

    # -- batches -------------------------------------------------------------------------------

    async def read_batch(
        self,
        kind: RunKind,
        run_ids: list[uuid.UUID],
        *,
        skip_locked: bool = False,
        proposal_ids: list[uuid.UUID] | None = None,
        known_ids: list[uuid.UUID] | None = None,
    ) -> BatchRead:
        """One round trip (``statements.READ_BATCH``): lock the runs of this kind that exist
        among ``run_ids``, in id order, and read them with their current states; find the
        replay records of ``proposal_ids``; tell which of ``known_ids`` are flow or task runs.
        With ``skip_locked``, runs another transaction holds are left out, not waited for.

        If a lock had to wait, the run row is read at its newest version but the joined
        state comes from the statement's older snapshot; those runs (their state ids differ)
        are read again, lock held, in a new snapshot. A replay record committed by the
        transaction waited for may be missed the same way; recording the proposal then
        fails as retryable, and the retry finds it.
        """
        query = sql.READ_BATCH[(kind, skip_locked)]
        (row,) = await self._fetch(query, run_ids, proposal_ids or [], known_ids or [])
        runs, processed, kinds = row  # decoded by the engine's JSON codec
        found = BatchRead()
        k = sql.KINDS[kind]
        stale = []
        for values in runs:
            if values[sql.CURRENT_STATE_ID] == values[sql.STATE_PREFIX + "id"]:
                run = run_from(k, values)
                found.runs[run.id] = run
            else:
                stale.append(uuid.UUID(values["id"]))
        if stale:
            found.runs.update(await self.read_runs(kind, stale))
        for record in processed:
            found.processed[uuid.UUID(record["proposal_id"])] = ProcessedProposal(
                body_sha256=record["body_sha256"],
                status=record["status"],
                outcome_json=record["outcome_json"],
                outbox_json=record["outbox_json"],
            )
        for known in kinds:
            found.kinds[uuid.UUID(known["id"])] = known["kind"]
        return found

    async def read_runs(
        self, kind: RunKind, run_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, FlowRun | TaskRun]:
        """The runs with their current states, without a lock."""
        k = sql.KINDS[kind]
        rows = await self._execute(sql.BATCH_BY_KIND[kind]["read_many"], {"ids": run_ids})
        return {row["id"]: run_from(k, row) for row in rows.mappings()}

    async def write_batch(self, rows: BatchRows) -> None:
        """Everything a batch writes, in one statement (``statements.WRITE_BATCH``).

        A new run that another transaction created first, a run that vanished, or a
        proposal id recorded meanwhile (one id used for two runs) fails the whole write as
        retryable: the caller's decisions assumed otherwise, and the retry sees the truth.
        """
        params = ["[" + ",".join(rows.json.get(name, ())) + "]" for name in sql.WRITE_BATCH_PARTS]
        (row,) = await self._fetch(sql.WRITE_BATCH, *params)
        counts = dict(zip(sql.WRITE_BATCH_COUNTS, row, strict=True))
        for name, expected in rows.expected.items():
            if counts[name] != expected:
                raise StoreError(
                    f"the batch wrote {counts[name]} of {expected} rows in {name}: another"
                    " transaction changed them first",
                    retryable=True,
                )

    async def fetch_rows(self, query: str, *args: Any) -> Sequence[Any]:
        """Rows of a prebuilt statement (``worker.db.sweeps``, ``worker.db.parked``) run in
        this transaction: the sweeps' claims and the parked proposals' bookkeeping."""
        return await self._fetch(query, *args)

    async def purge_processed(self, older_than: dt.datetime) -> int:
        """Forget proposals processed before ``older_than``; how many were removed."""
        p = tables.processed_proposal
        statement = sa.delete(p).where(p.c.processed_at < older_than)
        return (await self._execute(statement)).rowcount
