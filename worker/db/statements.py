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

from schemas.runs import FlowRun, RunKind, TaskRun
from schemas.states import StateType
from worker.db import tables


@dataclass(frozen=True)
class RunTables:
    """The tables and model of one run kind."""

    run: sa.Table
    state: sa.Table
    state_run_id: sa.Column[Any]
    model: type[FlowRun] | type[TaskRun]
    fields: tuple[str, ...]  # run columns that are model fields, in table order


def _run_tables(run: sa.Table, state: sa.Table, model: type[FlowRun] | type[TaskRun]) -> RunTables:
    fields = tuple(c.name for c in run.columns if c.name not in ("state_id", "created"))
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


def _with_processed(select: sa.Select[Any]) -> sa.Select[Any]:
    """``select`` plus the proposal's processed record, if any (LEFT JOIN on its id): the
    replay check rides on the run's read instead of costing a round trip of its own."""
    return select.add_columns(*_PROCESSED_COLUMNS).outerjoin(_P, _P.c.proposal_id == _PROPOSAL_ID)


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
        "read+processed": _with_processed(read),
        "locked_read+processed": _with_processed(locked_read),
        "lock": sa.select(run.c.id).where(run.c.id == _RUN_ID).with_for_update(),
        "insert_if_absent": pg_insert(run).on_conflict_do_nothing(index_elements=[run.c.id]),
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
_TAGS = sa.bindparam("tags", type_=ARRAY(sa.Text))

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


def _binds(table: sa.Table, prefix: str, columns: list[str]) -> dict[str, Any]:
    return {name: sa.bindparam(prefix + name, type_=table.c[name].type) for name in columns}


RUNS_SAVED = "runs_saved"


def _combined_writes(kind: RunTables) -> dict[str, Any]:
    """A transition's writes as one statement each way they can meet (data-modifying CTEs):
    the state insert and the run update, with or without recording the proposal. One round
    trip instead of up to three."""
    state_columns = [c.name for c in kind.state.columns if c.name not in ("created", "seq")]
    run_columns = [*(name for name in kind.fields if name != "id"), "state_id"]
    new_state = sa.insert(kind.state).values(_binds(kind.state, "s_", state_columns))
    saved_run = (
        sa.update(kind.run)
        .where(kind.run.c.id == sa.bindparam("r_key", type_=sa.Uuid))
        .values(_binds(kind.run, "r_", run_columns))
    )
    run_cte = saved_run.returning(kind.run.c.id).cte("saved_run")
    # The record returns how many runs were updated (no row at all: the id was a duplicate).
    runs_saved = sa.select(sa.func.count()).select_from(run_cte).scalar_subquery()
    record = RECORD_PROCESSED.returning(runs_saved.label(RUNS_SAVED))
    return {
        "state+run": saved_run.add_cte(new_state.cte("new_state")),
        "run+record": record.add_cte(run_cte),
        "state+run+record": record.add_cte(new_state.cte("new_state"), run_cte),
    }


COMBINED = {kind: _combined_writes(k) for kind, k in KINDS.items()}

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
LOCK_TAG_LIMITS = (
    sa.select(_LIMITS.c.tag, _LIMITS.c.concurrency_limit, _LIMITS.c.active_slots)
    .where(_LIMITS.c.tag == sa.any_(_TAGS))
    .order_by(_LIMITS.c.tag.collate("C"))
    .with_for_update()
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
        # Locked in id order, waiting for each (a batch of one), or skipping the runs other
        # transactions hold (a larger batch leaves those proposals to be settled alone).
        "lock_many": sa.select(run.c.id)
        .where(run.c.id == sa.any_(_IDS))
        .order_by(run.c.id)
        .with_for_update(),
        "lock_many_skip_locked": sa.select(run.c.id)
        .where(run.c.id == sa.any_(_IDS))
        .order_by(run.c.id)
        .with_for_update(skip_locked=True),
        # A statement after the locks: its snapshot sees what the lock waits let commit.
        "read_many": _run_select(kind).where(run.c.id == sa.any_(_IDS)),
        "insert_many_if_absent": pg_insert(run)
        .on_conflict_do_nothing(index_elements=[run.c.id])
        .returning(run.c.id),
    }


BATCH_BY_KIND = {kind: _batch_statements(k) for kind, k in KINDS.items()}
FIND_PROCESSED_MANY = sa.select(
    _P.c.proposal_id.label(PROCESSED_PREFIX + "proposal_id"), *_PROCESSED_COLUMNS
).where(_P.c.proposal_id == sa.any_(_IDS))
RUN_KINDS_OF_MANY = (
    sa.select(tables.flow_run.c.id, sa.literal("flow_run").label("kind"))
    .where(tables.flow_run.c.id == sa.any_(_IDS))
    .union_all(
        sa.select(tables.task_run.c.id, sa.literal("task_run").label("kind")).where(
            tables.task_run.c.id == sa.any_(_IDS)
        )
    )
)
RECORD_PROCESSED_MANY = RECORD_PROCESSED.returning(_P.c.proposal_id)
