"""The SQL of the store, built once: run and state tables per run kind, and every statement
of the hot path with bind parameters.

Building a Core statement per call (coercing every value, computing its cache key)
cost more CPU than running it, so ``PgStore`` only picks a statement here and binds
values. Names of bind parameters are part of each statement's contract with the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import StateType
from arbiter.worker.db import tables


@dataclass(frozen=True)
class RunTables:
    """The tables and model of one run kind."""

    run: sa.Table
    state: sa.Table
    state_run_id: sa.Column[Any]
    model: type[FlowRun] | type[TaskRun]
    fields: tuple[str, ...]  # run columns that are model fields, in table order


def _run_tables(run: sa.Table, state: sa.Table, model: type[FlowRun] | type[TaskRun]) -> RunTables:
    # Plain str, not quoted_name: these are the keys of every row the flush serialises, and
    # pydantic_core serialises a str subclass as a key a hundred times slower.
    fields = tuple(str(c.name) for c in run.columns if c.name not in ("state_id", "created"))
    missing = set(fields) - set(model.model_fields)
    if missing:
        raise TypeError(f"{run.name} columns without a {model.__name__} field: {missing}")
    return RunTables(run, state, state.c[f"{run.name}_id"], model, fields)


KINDS: dict[RunKind, RunTables] = {
    "flow_run": _run_tables(tables.flow_run, tables.flow_run_state, FlowRun),
    "task_run": _run_tables(tables.task_run, tables.task_run_state, TaskRun),
}

STATE_FIELDS = ("id", "type", "name", "timestamp", "message", "state_details", "data")
STATE_PREFIX = "state__"


def _run_select(kind: RunTables) -> sa.Select[Any]:
    """The run's columns and its current state's, in one row (LEFT JOIN: a run may have none)."""
    state_columns = [kind.state.c[name].label(STATE_PREFIX + name) for name in STATE_FIELDS]
    return sa.select(*(kind.run.c[name] for name in kind.fields), *state_columns).select_from(
        kind.run.outerjoin(kind.state, kind.state.c.id == kind.run.c.state_id)
    )


_RUN_ID = sa.bindparam("run_id", type_=sa.Uuid)
CURRENT_STATE_ID = "current_state_id"

_P = tables.processed_proposal
_PROPOSAL_ID = sa.bindparam("proposal_id", type_=sa.Uuid)
PROCESSED_PREFIX = "processed__"
# A processed proposal's record, as ``PgStore`` reads it (JSON as text: parsed once, later).
_PROCESSED_COLUMNS = [
    _P.c.body_sha256.label(PROCESSED_PREFIX + "body_sha256"),
    _P.c.status.label(PROCESSED_PREFIX + "status"),
    sa.cast(_P.c.outcome, sa.Text).label(PROCESSED_PREFIX + "outcome_json"),
    sa.cast(_P.c.outbox, sa.Text).label(PROCESSED_PREFIX + "outbox_json"),
]


def _statements(kind: RunTables) -> dict[str, Any]:
    run = kind.run
    read = _run_select(kind).where(run.c.id == _RUN_ID)
    locked_read = (
        _run_select(kind)
        .add_columns(run.c.state_id.label(CURRENT_STATE_ID))
        .where(run.c.id == _RUN_ID)
        .with_for_update(of=run)
    )
    return {
        "read": read,
        "locked_read": locked_read,
        "lock": sa.select(run.c.id).where(run.c.id == _RUN_ID).with_for_update(),
        "update": sa.update(run).where(run.c.id == sa.bindparam("run_key", type_=sa.Uuid)),
        "insert_state": sa.insert(kind.state),
    }


BY_KIND = {kind: _statements(k) for kind, k in KINDS.items()}


_COMPLETED = StateType.COMPLETED.value
RUN_KIND_OF = (
    sa.select(sa.literal("flow_run"))
    .where(tables.flow_run.c.id == _RUN_ID)
    .union_all(sa.select(sa.literal("task_run")).where(tables.task_run.c.id == _RUN_ID))
    .limit(1)
)

FIND_PROCESSED = sa.select(*_PROCESSED_COLUMNS).where(_P.c.proposal_id == _PROPOSAL_ID)
# The outcome and outbox arrive as JSON text and are cast by the server: no second encoding.
RECORD_PROCESSED = (
    pg_insert(_P)
    .values(
        proposal_id=sa.bindparam("p_proposal_id", type_=sa.Uuid),
        body_sha256=sa.bindparam("p_body_sha256", type_=sa.Text),
        run_kind=sa.bindparam("p_run_kind", type_=sa.Text),
        run_id=sa.bindparam("p_run_id", type_=sa.Uuid),
        status=sa.bindparam("p_status", type_=sa.Text),
        outcome=sa.cast(sa.bindparam("p_outcome", type_=sa.Text), JSONB),
        outbox=sa.cast(sa.bindparam("p_outbox", type_=sa.Text), JSONB),
    )
    .on_conflict_do_nothing(index_elements=[_P.c.proposal_id])
)


_S, _CACHE, _LIMITS = tables.task_run_state, tables.task_run_state_cache, tables.concurrency_limit
_NOW_PARAM = sa.bindparam("now", type_=sa.DateTime(timezone=True))
FIND_CACHED = (
    sa.select(*(_S.c[name] for name in STATE_FIELDS))
    .select_from(_CACHE.join(_S, _S.c.id == _CACHE.c.task_run_state_id))
    .where(
        _CACHE.c.cache_key == sa.bindparam("cache_key", type_=sa.Text),
        sa.or_(_CACHE.c.cache_expiration.is_(None), _CACHE.c.cache_expiration > _NOW_PARAM),
        _S.c.type == _COMPLETED,
    )
    .order_by(_CACHE.c.created.desc(), _CACHE.c.id.desc())
    .limit(1)
)
INSERT_CACHE_ENTRY = sa.insert(_CACHE)
# The same lock as plain SQL for the driver: $1 the tags.
LOCK_TAG_LIMITS_SQL = (
    f"SELECT tag, concurrency_limit, active_slots, slot_expires FROM {_LIMITS.name}"
    f' WHERE tag = ANY(CAST($1 AS text[])) ORDER BY tag COLLATE "C" FOR UPDATE'
)
SAVE_TAG_LIMIT = (
    sa.update(_LIMITS)
    .where(_LIMITS.c.tag == sa.bindparam("limit_tag", type_=sa.Text))
    .values(updated=sa.func.now())
)
_FS = tables.flow_run_state
FLOW_TIMESTAMP_TAKEN = sa.select(
    sa.exists().where(
        _FS.c.flow_run_id == _RUN_ID,
        _FS.c.timestamp == sa.bindparam("timestamp", type_=sa.DateTime(timezone=True)),
    )
)


# --- batches: many runs and proposals per statement -------------------------------------------

_IDS = sa.bindparam("ids", type_=ARRAY(sa.Uuid))


def _batch_statements(kind: RunTables) -> dict[str, Any]:
    run = kind.run

    return {
        "read_many": _run_select(kind).where(run.c.id == sa.any_(_IDS)),
    }


BATCH_BY_KIND = {kind: _batch_statements(k) for kind, k in KINDS.items()}


def _columns(table: sa.Table, *skipped: str) -> list[str]:
    return [c.name for c in table.columns if c.name not in ("created", "seq", *skipped)]


def _json(name: str) -> str:
    # JSON text in, parsed by the server: the driver's own JSON codec is not involved.
    return f"CAST(CAST(${WRITE_BATCH_PARTS.index(name) + 1} AS text) AS jsonb)"


def _write_batch() -> str:
    """Everything a batch writes, in one statement: each table's rows arrive as one JSON
    array (``jsonb_populate_recordset`` types them by the table's columns), each written by
    one data-modifying CTE. New runs are inserted with their final values (an UPDATE could
    not see a row inserted by the same statement); a run another transaction created first
    is not inserted, and the counts returned tell the caller so."""
    parts = []
    for kind, k in KINDS.items():
        run, state = k.run.name, k.state.name
        run_cols = ", ".join(_columns(k.run))
        state_cols = ", ".join(_columns(k.state))
        updated = [c for c in _columns(k.run) if c != "id"]
        sets = ", ".join(f"{c} = r.{c}" for c in updated)
        saved = _json(kind + "_saved")
        parts += [
            f"{kind}_new AS (INSERT INTO {run} ({run_cols}) SELECT {run_cols}"
            f" FROM jsonb_populate_recordset(NULL::{run}, {_json(kind + '_new')})"
            f" ON CONFLICT (id) DO NOTHING RETURNING id)",
            # The ids again, as an array: the (generic) plan then finds the runs by their
            # primary key. Joined on the record set alone (100 rows to the planner), it
            # hash-joined a scan of the whole run table (0.4 ms at 3,000 task runs, more
            # as the table grows) until the table got large enough for an index plan.
            f"{kind}_saved AS (UPDATE {run} AS t SET {sets}"
            f" FROM jsonb_populate_recordset(NULL::{run}, {saved}) AS r"
            f" WHERE t.id = r.id AND t.id = ANY(ARRAY("
            f"SELECT CAST(e ->> 'id' AS uuid) FROM jsonb_array_elements({saved}) AS e))"
            f" RETURNING t.id)",
            # Only for runs this statement wrote: a run another transaction created first
            # gets no state, so its foreign-key check never waits on that transaction's lock
            # (the counts fail the write as retryable anyway).
            # In the order written: ``seq`` keeps a run's history in that order.
            f"{kind}_states AS (INSERT INTO {state} ({state_cols}) SELECT {state_cols}"
            f" FROM jsonb_populate_recordset(NULL::{state}, {_json(kind + '_states')})"
            f" WITH ORDINALITY AS written"
            f" WHERE {kind}_id IN (SELECT id FROM {kind}_new UNION ALL"
            f" SELECT id FROM {kind}_saved) ORDER BY written.ordinality)",
        ]
    cache = tables.task_run_state_cache.name
    cache_cols = ", ".join(_columns(tables.task_run_state_cache, "id"))
    limits = tables.concurrency_limit.name
    processed = _P.name
    processed_cols = ", ".join(_columns(_P, "processed_at"))
    parts += [
        # In the order written: the newest entry of a key (highest id) is the one found.
        f"cache AS (INSERT INTO {cache} ({cache_cols}) SELECT {cache_cols}"
        f" FROM jsonb_populate_recordset(NULL::{cache}, {_json('cache')})"
        f" WITH ORDINALITY AS written ORDER BY written.ordinality)",
        f"limits AS (UPDATE {limits} AS t SET active_slots = r.active_slots,"
        " slot_expires = r.slot_expires, updated = now()"
        f" FROM jsonb_populate_recordset(NULL::{limits}, {_json('limits')}) AS r"
        " WHERE t.tag = r.tag)",
        f"recorded AS (INSERT INTO {processed} ({processed_cols}) SELECT {processed_cols}"
        f" FROM jsonb_populate_recordset(NULL::{processed}, {_json('records')})"
        f" ON CONFLICT (proposal_id) DO NOTHING RETURNING proposal_id)",
    ]
    counts = ", ".join(f"(SELECT count(*) FROM {name}) AS {name}" for name in WRITE_BATCH_COUNTS)
    return "WITH " + ",\n".join(parts) + f"\nSELECT {counts}"


# The JSON arrays ``WRITE_BATCH`` takes, in the order of its positional parameters.
WRITE_BATCH_PARTS = (
    *(f"{kind}_{part}" for kind in KINDS for part in ("new", "saved", "states")),
    "cache",
    "limits",
    "records",
)
# The counts ``WRITE_BATCH`` returns, in its columns' order.
WRITE_BATCH_COUNTS = (
    "flow_run_new",
    "flow_run_saved",
    "task_run_new",
    "task_run_saved",
    "recorded",
)
WRITE_BATCH = _write_batch()


def _read_batch(kind: RunTables, *, skip_locked: bool) -> str:
    """A batch's reads in one round trip, as three JSON arrays: its runs of this kind,
    locked in id order (so batches over overlapping runs never deadlock) with their
    current states; the replay records of its proposal ids; and which of the ids it asks
    about are flow runs or task runs (for runs to create, held elsewhere, or parents).

    ``total_run_time`` comes as seconds (an interval's text is not ISO 8601).
    """
    run, state = kind.run.name, kind.state.name
    run_cols = [
        f"EXTRACT(EPOCH FROM r.{c}) AS {c}" if c == "total_run_time" else f"r.{c}"
        for c in kind.fields
    ]
    state_cols = [f"s.{c} AS {STATE_PREFIX}{c}" for c in STATE_FIELDS]
    lock = "FOR UPDATE OF r SKIP LOCKED" if skip_locked else "FOR UPDATE OF r"
    flow, task = tables.flow_run.name, tables.task_run.name
    text = f"""WITH locked AS (
  SELECT {", ".join(run_cols)}, r.state_id AS {CURRENT_STATE_ID}, {", ".join(state_cols)}
  FROM {run} r LEFT JOIN {state} s ON s.id = r.state_id
  WHERE r.id = ANY(CAST($1 AS uuid[])) ORDER BY r.id {lock})
SELECT
  (SELECT coalesce(json_agg(locked), '[]') FROM locked) AS runs,
  (SELECT coalesce(json_agg(p), '[]') FROM (
     SELECT proposal_id, body_sha256, status, outcome::text AS outcome_json,
            outbox::text AS outbox_json
     FROM {_P.name} WHERE proposal_id = ANY(CAST($2 AS uuid[]))) p) AS processed,
  (SELECT coalesce(json_agg(k), '[]') FROM (
     SELECT id, 'flow_run' AS kind FROM {flow} WHERE id = ANY(CAST($3 AS uuid[]))
     UNION ALL
     SELECT id, 'task_run' AS kind FROM {task} WHERE id = ANY(CAST($3 AS uuid[]))
   ) k) AS kinds"""
    return text


READ_BATCH = {
    (kind, skip_locked): _read_batch(k, skip_locked=skip_locked)
    for kind, k in KINDS.items()
    for skip_locked in (False, True)
}
