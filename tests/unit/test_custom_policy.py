"""The example custom rule (tests/fixtures/custom_policy.py) on the in-memory store."""

from __future__ import annotations

import dataclasses
import uuid

from pydantic import JsonValue

from arbiter.rules.engine import Orchestrator, default_policies
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus, StateAbortDetails
from arbiter.schemas import FlowRun, StateType
from arbiter.schemas.messages import RuleEffect, RuleTraceEntry
from tests.factories import make_state
from tests.fixtures.custom_policy import (
    MISSING_TICKET_REASON,
    RequireTicketForProduction,
    TicketedFlowPolicy,
)

ORCHESTRATOR = Orchestrator(
    policies=dataclasses.replace(default_policies(), flow=TicketedFlowPolicy)
)


async def pending_run(
    store: InMemoryStore, *, tags: list[str], parameters: dict[str, JsonValue]
) -> FlowRun:
    """A flow run taken SCHEDULED → PENDING through the ticketed policy."""
    run = FlowRun(id=uuid.uuid4(), name="deploy", tags=tags, parameters=parameters)
    await store.create_run("flow_run", run)
    for state_type in (StateType.SCHEDULED, StateType.PENDING):
        ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(state_type))
        assert ctx.response_status is SetStateStatus.ACCEPT
    return run


def test_the_policy_puts_the_rule_outermost() -> None:
    """The custom rule comes first and the core rules follow unchanged."""
    priority = TicketedFlowPolicy.priority()
    assert priority[0] is RequireTicketForProduction
    rules = TicketedFlowPolicy.compile_transition_rules(StateType.PENDING, StateType.RUNNING)
    assert rules[0] is RequireTicketForProduction


async def test_a_production_run_without_a_ticket_is_aborted(store: InMemoryStore) -> None:
    """RUNNING is refused, nothing is written, and the trace names the rule."""
    run = await pending_run(store, tags=["production"], parameters={"x": 1})

    ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(StateType.RUNNING))

    assert ctx.response_status is SetStateStatus.ABORT
    assert ctx.response_details == StateAbortDetails(reason=MISSING_TICKET_REASON)
    assert ctx.validated_state_type is StateType.PENDING
    assert run.state_type is StateType.PENDING
    assert ctx.rule_trace == [
        RuleTraceEntry(
            rule="RequireTicketForProduction", effect=RuleEffect.ABORT, reason=MISSING_TICKET_REASON
        )
    ]


async def test_a_production_run_with_no_state_is_aborted_too(store: InMemoryStore) -> None:
    """A first proposal straight to RUNNING (no initial state) is aborted, not rejected."""
    run = FlowRun(id=uuid.uuid4(), tags=["production"])
    await store.create_run("flow_run", run)

    ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(StateType.RUNNING))

    assert ctx.response_status is SetStateStatus.ABORT
    assert ctx.validated_state is None
    assert run.state is None


async def test_a_production_run_with_a_ticket_runs(store: InMemoryStore) -> None:
    run = await pending_run(store, tags=["production"], parameters={"ticket": "CHG-42"})

    ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(StateType.RUNNING))

    assert ctx.response_status is SetStateStatus.ACCEPT
    assert run.state_type is StateType.RUNNING
    assert all(entry.rule != "RequireTicketForProduction" for entry in ctx.rule_trace)


async def test_a_run_without_the_production_tag_runs(store: InMemoryStore) -> None:
    run = await pending_run(store, tags=["staging"], parameters={})

    ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(StateType.RUNNING))

    assert ctx.response_status is SetStateStatus.ACCEPT
    assert run.state_type is StateType.RUNNING


async def test_other_transitions_of_a_production_run_are_untouched(store: InMemoryStore) -> None:
    """The rule only governs entering RUNNING: SCHEDULED and PENDING were accepted above,
    and a production run without a ticket may still be cancelled."""
    run = await pending_run(store, tags=["production"], parameters={})

    ctx = await ORCHESTRATOR.set_flow_run_state(store, run, make_state(StateType.CANCELLED))

    assert ctx.response_status is SetStateStatus.ACCEPT
    assert run.state_type is StateType.CANCELLED
