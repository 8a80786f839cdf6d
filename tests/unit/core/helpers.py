"""Helpers shared by the flow- and task-rule scenarios: readable ids, a frozen clock,
entering rules by hand as Prefect's own tests do, and arranging or observing a store
through its public interface only (``rules.store``), so a scenario runs on both stores."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import pytest

from rules.base import ALL_ORCHESTRATION_STATES, TERMINAL_TYPES, StateTypeOrNone
from rules.context import OrchestrationContext
from rules.engine import Orchestrator
from rules.policy import RuleClass
from rules.store import Store
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


async def hold_slots(store: Store, tag: str, holders: list[str]) -> None:
    """Make ``holders`` the runs holding ``tag``'s slots, as a claimer writes them: lock, save."""
    limits = await store.lock_tag_limits([tag])
    if [limit.tag for limit in limits] != [tag]:
        raise KeyError(tag)
    limits[0].active_slots = list(holders)
    await store.save_tag_limit(limits[0])


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
