"""Proposals, outcomes and stored histories, as the API scenarios read them."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import (
    FlowRun,
    FlowRunSpec,
    Outcome,
    OutcomeStatus,
    ProposedState,
    RunKind,
    State,
    StateDetails,
    StateType,
    TaskRun,
)
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.store import PgStore


def proposed(
    state_type: StateType,
    name: str | None = None,
    *,
    data: JsonValue = None,
    **details: object,
) -> ProposedState:
    return ProposedState(
        type=state_type,
        name=name,
        data=data,
        state_details=StateDetails.model_validate(details),
    )


def in_days(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


async def show_run(
    engine: AsyncEngine, kind: RunKind, run_id: uuid.UUID
) -> tuple[FlowRun | TaskRun | None, list[State]]:
    """The run and its history, oldest first: what ``arbiter runs show`` reads."""
    async with engine.connect() as conn:
        store = PgStore(conn)
        run = (
            await store.read_flow_run(run_id)
            if kind == "flow_run"
            else await store.read_task_run(run_id)
        )
        return run, await store.read_history(kind, run_id)


async def history(engine: AsyncEngine, kind: RunKind, run_id: uuid.UUID) -> list[tuple[str, str]]:
    """The run's states as (type, name), oldest first."""
    _, states = await show_run(engine, kind, run_id)
    return [(s.type.value, s.name) for s in states]


def accepted(outcome: Outcome) -> State:
    assert outcome.status is OutcomeStatus.ACCEPT, (outcome.status, outcome.details)
    assert outcome.state is not None
    return outcome.state


async def running_flow_run(client: ArbiterClient, spec: FlowRunSpec | None = None) -> uuid.UUID:
    """A new flow run, RUNNING (its first attempt, run_count 1)."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "flow_run", run_id, proposed(StateType.RUNNING), run=spec or FlowRunSpec()
    )
    accepted(outcome)
    return run_id
