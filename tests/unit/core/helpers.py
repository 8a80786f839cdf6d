"""Helpers shared by the flow- and task-rule scenarios: readable ids, a frozen clock,
and entering rules by hand as Prefect's own tests do."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from typing import TypeVar

from rules.base import ALL_ORCHESTRATION_STATES, TERMINAL_TYPES, StateTypeOrNone
from rules.context import OrchestrationContext
from rules.engine import Orchestrator
from rules.policy import RuleClass
from schemas.states import StateType

# Sorted lists (``None`` sorts as "None") so parametrized ids are deterministic.
ALL_STATES: list[StateTypeOrNone] = sorted(ALL_ORCHESTRATION_STATES, key=str)
CANONICAL_STATES: list[StateType] = list(StateType)
TERMINAL_STATES: list[StateType] = sorted(t for t in TERMINAL_TYPES if t is not None)

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
PERSISTED_RESULT = {"storage_key": "/results/abc", "serializer": {"type": "pickle"}}

ContextT = TypeVar("ContextT", bound=OrchestrationContext)  # type: ignore[type-arg]


def name_of(state_type: StateTypeOrNone) -> str:
    return state_type.name if state_type is not None else "None"


def transition_id(transition: tuple[StateTypeOrNone, StateTypeOrNone]) -> str:
    """``RUNNING->PENDING``: readable parametrize ids."""
    return f"{name_of(transition[0])}->{name_of(transition[1])}"


def type_id(value: object) -> str:
    return name_of(value) if isinstance(value, StateType) or value is None else str(value)


def frozen_orchestrator(now: dt.datetime = NOW) -> Orchestrator:
    """An orchestrator whose clock always reads ``now``."""
    return Orchestrator(clock=lambda: now)


async def apply_rules(
    ctx: ContextT, rules: Sequence[RuleClass], *, validate: bool = True
) -> ContextT:
    """Enter ``rules`` in order for the context's intended transition, validate, unwind."""
    intended = (ctx.initial_state_type, ctx.proposed_state_type)
    async with contextlib.AsyncExitStack() as stack:
        for rule in rules:
            ctx = await stack.enter_async_context(rule(ctx, *intended))
        if validate:
            await ctx.validate_proposed_state()
    return ctx
