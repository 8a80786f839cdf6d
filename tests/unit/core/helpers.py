"""Helpers shared by the flow- and task-rule scenarios: readable ids, a frozen clock,
entering rules by hand as Prefect's own tests do, task rules that reject or abort every
transition, and arranging or observing a store through its public interface only
(``rules.store``), so a scenario runs on both stores."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import pytest

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    TERMINAL_TYPES,
    BaseOrchestrationRule,
    FlowRunOrchestrationRule,
    StateTypeOrNone,
    TaskRunOrchestrationRule,
)
from arbiter.rules.context import OrchestrationContext, TaskOrchestrationContext
from arbiter.rules.engine import Orchestrator
from arbiter.rules.policy import RuleClass
from arbiter.rules.store import AdminStore, Store
from arbiter.schemas.states import State, StateType

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


def other_types(*excluded: StateType) -> list[StateType]:
    return [t for t in CANONICAL_STATES if t not in excluded]


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


def rejecting_rule(
    to_type: StateType,
    base: type[FlowRunOrchestrationRule] | type[TaskRunOrchestrationRule] = (
        TaskRunOrchestrationRule
    ),
) -> RuleClass:
    """A rule (a task-run rule unless ``base`` says otherwise) that rejects any transition
    into a copy of the proposed state of ``to_type``."""

    async def before_transition(
        self: BaseOrchestrationRule[Any],
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext[Any],
    ) -> None:
        assert proposed_state is not None
        mutated = proposed_state.model_copy(update={"type": to_type})
        await self.reject_transition(mutated, reason="gotta fizzle some rules, for fun")

    namespace = {
        "FROM_STATES": ALL_ORCHESTRATION_STATES,
        "TO_STATES": ALL_ORCHESTRATION_STATES,
        "before_transition": before_transition,
    }
    rule: RuleClass = type("RejectIntoAnotherType", (base,), namespace)
    return rule


class AbortingRule(TaskRunOrchestrationRule):
    """Aborts every transition."""

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        await self.abort_transition(reason="For testing purposes")


async def hold_slots(store: Store, tag: str, holders: list[str]) -> None:
    """Make ``holders`` the runs holding ``tag``'s slots, as a claimer writes them: lock, save."""
    limits = await store.lock_tag_limits([tag])
    if [limit.tag for limit in limits] != [tag]:
        raise KeyError(tag)
    limits[0].active_slots = list(holders)
    await store.save_tag_limit(limits[0])


async def slots(store: AdminStore, tag: str) -> list[str]:
    """The run ids holding a slot of ``tag``'s limit, through the store's public API."""
    for limit in await store.list_tag_limits():
        if limit.tag == tag:
            return limit.active_slots
    raise KeyError(tag)


async def lose_flow_run(store: AdminStore, ctx: TaskOrchestrationContext) -> None:
    """Make the task's flow run unreadable, as if it had been deleted.

    The store has no delete, so the task run is pointed at a flow run id that was
    never stored; ``read_flow_run`` answers None for it exactly as for a deleted run
    (``task_run.flow_run_id`` has no foreign key: a task may arrive before its flow run).
    """
    assert await ctx.flow_run() is not None
    ctx.run.flow_run_id = uuid.uuid4()
    await store.save_run("task_run", ctx.run)
    assert await ctx.flow_run() is None


class CacheInsertionCall(NamedTuple):
    cache_key: str
    expiration: dt.datetime | None
    state_id: uuid.UUID


def record_cache_insertions(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> list[CacheInsertionCall]:
    """Every ``insert_cache_entry`` call made on ``store`` from now on, still passed through.

    An entry whose state is not COMPLETED (or not written) is invisible to
    ``find_cached_state``, so "nothing was cached" is observed at the interface itself.
    """
    calls: list[CacheInsertionCall] = []
    insert = store.insert_cache_entry

    async def recording_insert(
        cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        calls.append(CacheInsertionCall(cache_key, expiration, state_id))
        await insert(cache_key, expiration, state_id)

    monkeypatch.setattr(store, "insert_cache_entry", recording_insert)
    return calls
