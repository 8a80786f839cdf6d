"""Building flow contexts by hand and running the transform on them, as Prefect's
instrumentation tests do, and reading the one event a transition emitted."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, cast

from arbiter.rules.context import FlowOrchestrationContext, OrchestrationContext
from arbiter.rules.instrumentation import InstrumentFlowRunStateTransitions
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.policy import RuleClass
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateType

Transition = tuple[StateType | None, StateType | None]
RUNNING_TRANSITION: Transition = (StateType.PENDING, StateType.RUNNING)


def flow_context(
    store: InMemoryStore,
    run: FlowRun,
    initial_state: State | None,
    proposed_state: State | None,
) -> FlowOrchestrationContext:
    """A flow context built by hand, as Prefect's instrumentation tests do."""
    return FlowOrchestrationContext(
        store=store, run=run, initial_state=initial_state, proposed_state=proposed_state
    )


def pending_to_running(store: InMemoryStore, run: FlowRun) -> FlowOrchestrationContext:
    """A hand-built PENDING → RUNNING context for ``run``."""
    return flow_context(store, run, State(type=StateType.PENDING), State(type=StateType.RUNNING))


async def instrument(
    ctx: FlowOrchestrationContext, transition: Transition
) -> FlowOrchestrationContext:
    """Run the transform alone around validation."""
    async with InstrumentFlowRunStateTransitions(ctx, *transition):
        await ctx.validate_proposed_state()
    return ctx


async def apply_rules(
    ctx: FlowOrchestrationContext, rules: Sequence[RuleClass], transition: Transition
) -> FlowOrchestrationContext:
    async with contextlib.AsyncExitStack() as stack:
        for rule in rules:
            ctx = await stack.enter_async_context(rule(ctx, *transition))
        await ctx.validate_proposed_state()
    return ctx


def only_event(ctx: OrchestrationContext) -> dict[str, Any]:  # type: ignore[type-arg]
    """The one event the transition emitted, checking how it was addressed."""
    (message,) = ctx.outbox
    assert message.channel == "event"
    assert message.routing_key == message.body["event"]
    assert message.message_id == message.body["id"]
    return cast(dict[str, Any], message.body)
