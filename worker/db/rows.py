"""Rows and models: what a column holds for each field of a run, a state, a processed
proposal or a tag limit, both ways. Shared by ``PgStore`` and the batch overlay."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import RowMapping

from arbiter.rules.store import TagLimit
from arbiter.schemas.runs import FlowRun, TaskRun
from arbiter.schemas.states import State
from arbiter.worker.db import statements as sql
from arbiter.worker.db.batch_rows import ProcessedProposal

__all__ = [
    "processed_from",
    "run_from",
    "run_values",
    "slot_expires_from",
    "slot_expires_json",
    "state_from",
    "state_values",
    "tag_limit_from",
]


def state_from(row: Mapping[Any, Any], prefix: str = "") -> State:
    return State.model_validate({name: row[prefix + name] for name in sql.STATE_FIELDS})


def run_from(kind: sql.RunTables, row: Mapping[Any, Any]) -> FlowRun | TaskRun:
    values = {name: row[name] for name in kind.fields}
    if row[sql.STATE_PREFIX + "id"] is not None:
        values["state"] = state_from(row, sql.STATE_PREFIX)
    return kind.model.model_validate(values)


def processed_from(row: RowMapping) -> ProcessedProposal | None:
    """The processed record in a row (None where a LEFT JOIN found none)."""
    prefix = sql.PROCESSED_PREFIX
    if row[prefix + "status"] is None:
        return None
    return ProcessedProposal(
        body_sha256=row[prefix + "body_sha256"],
        status=row[prefix + "status"],
        outcome_json=row[prefix + "outcome_json"],
        outbox_json=row[prefix + "outbox_json"],
    )


def run_values(kind: sql.RunTables, run: FlowRun | TaskRun) -> dict[str, Any]:
    """Column values of a run; JSON columns get JSON-native values (no sets, no UUIDs)."""
    values = {name: getattr(run, name) for name in kind.fields}
    values["tags"] = list(run.tags)
    values["empirical_policy"] = run.empirical_policy.model_dump(mode="json")
    values["state_type"] = run.state_type.value if run.state_type is not None else None
    values["state_id"] = run.state_id
    return values


def state_values(kind: sql.RunTables, run_id: uuid.UUID, state: State) -> dict[str, Any]:
    return {
        "id": state.id,
        str(kind.state_run_id.name): run_id,
        "type": state.type.value,
        "name": state.name,
        "timestamp": state.timestamp,
        "message": state.message,
        "state_details": state.state_details.model_dump(mode="json"),
        "data": state.data,
    }


def tag_limit_from(record: Any) -> TagLimit:
    """From an asyncpg record (the worker's transactions) or a SQLAlchemy row."""
    row = getattr(record, "_mapping", record)
    return TagLimit(
        tag=row["tag"],
        limit=row["concurrency_limit"],
        active_slots=list(row["active_slots"]),
        expires=slot_expires_from(row["slot_expires"]),
    )


def slot_expires_from(value: Mapping[str, str]) -> dict[str, dt.datetime]:
    return {holder: dt.datetime.fromisoformat(at) for holder, at in value.items()}


def slot_expires_json(limit: TagLimit) -> dict[str, str]:
    return {holder: at.isoformat() for holder, at in limit.expires.items()}
