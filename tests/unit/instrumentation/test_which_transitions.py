"""Which transitions are announced: written states are, forced and rejected ones
included; task runs, aborts, waits and null rejects are not."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, FlowRunOrchestrationRule
from arbiter.rules.context import FlowOrchestrationContext, TaskOrchestrationContext
from arbiter.rules.engine import Orchestrator, default_policies
from arbiter.rules.instrumentation import InstrumentFlowRunStateTransitions
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.policies import MinimalFlowPolicy
from arbiter.rules.policy import BaseOrchestrationPolicy, RuleClass
from arbiter.rules.results import SetStateStatus
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateType, utcnow
from tests.factories import create_flow_run, create_task_run
from tests.unit.instrumentation.helpers import (
    RUNNING_TRANSITION,
    apply_rules,
    only_event,
    pending_to_running,
)


def nullifying_rule(*, delay: bool) -> type[FlowRunOrchestrationRule]:
    """A rule that aborts (or delays) every transition."""

    class Nullify(FlowRunOrchestrationRule):
        FROM_STATES = ALL_ORCHESTRATION_STATES
        TO_STATES = ALL_ORCHESTRATION_STATES

        async def before_transition(
            self,
            initial_state: State | None,
            proposed_state: State | None,
            context: FlowOrchestrationContext,
        ) -> None:
            if delay:
                await self.delay_transition(10, "I'll get to it when I get to it")
            else:
                await self.abort_transition("I am just plain ugly")

    return Nullify


async def test_does_nothing_for_task_transitions(store: InMemoryStore) -> None:
    """Task-run transitions emit no flow-run event."""
    task_run = await create_task_run(store, flow_run_id=None)
    ctx = TaskOrchestrationContext(
        store=store,
        run=task_run,
        initial_state=State(type=StateType.PENDING),
        proposed_state=State(type=StateType.RUNNING),
    )

    # A flow transform on a task context, on purpose: it must notice and do nothing.
    async with InstrumentFlowRunStateTransitions(ctx, *RUNNING_TRANSITION):  # type: ignore[arg-type]
        await ctx.validate_proposed_state()

    assert ctx.outbox == []


async def test_still_instruments_rejected_state_transitions(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """A REJECT that writes a replacement state announces the replacement."""

    class FussyRule(FlowRunOrchestrationRule):
        FROM_STATES = ALL_ORCHESTRATION_STATES
        TO_STATES = ALL_ORCHESTRATION_STATES

        async def before_transition(
            self,
            initial_state: State | None,
            proposed_state: State | None,
            context: FlowOrchestrationContext,
        ) -> None:
            assert proposed_state is not None
            new_state = proposed_state.model_copy()
            new_state.name = "Cancelled Fussily"
            new_state.type = StateType.CANCELLED
            await self.reject_transition(new_state, reason="I am fussy")

    ctx = pending_to_running(store, flow_run)

    ctx = await apply_rules(ctx, [InstrumentFlowRunStateTransitions, FussyRule], RUNNING_TRANSITION)

    assert ctx.response_status == SetStateStatus.REJECT
    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Cancelled Fussily"
    assert event["resource"]["prefect.state-type"] == "CANCELLED"


async def test_does_nothing_for_aborted_transitions(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """Nothing written, nothing announced: ABORT emits no event."""
    ctx = pending_to_running(store, flow_run)

    ctx = await apply_rules(
        ctx, [InstrumentFlowRunStateTransitions, nullifying_rule(delay=False)], RUNNING_TRANSITION
    )

    assert ctx.response_status == SetStateStatus.ABORT
    assert ctx.outbox == []


async def test_does_nothing_for_delayed_transitions(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """Nothing written, nothing announced: WAIT emits no event."""
    ctx = pending_to_running(store, flow_run)

    ctx = await apply_rules(
        ctx, [InstrumentFlowRunStateTransitions, nullifying_rule(delay=True)], RUNNING_TRANSITION
    )

    assert ctx.response_status == SetStateStatus.WAIT
    assert ctx.outbox == []


async def test_does_nothing_for_null_rejected_transitions(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """A null REJECT writes nothing new, so it emits no event."""

    class NullRejector(FlowRunOrchestrationRule):
        FROM_STATES = ALL_ORCHESTRATION_STATES
        TO_STATES = ALL_ORCHESTRATION_STATES

        async def before_transition(
            self,
            initial_state: State | None,
            proposed_state: State | None,
            context: FlowOrchestrationContext,
        ) -> None:
            await self.reject_transition(None, reason="not this one")

    ctx = pending_to_running(store, flow_run)

    ctx = await apply_rules(
        ctx, [InstrumentFlowRunStateTransitions, NullRejector], RUNNING_TRANSITION
    )

    assert ctx.response_status == SetStateStatus.REJECT
    assert ctx.outbox == []


async def test_cancelling_to_cancelled_transitions(store: InMemoryStore) -> None:
    """A forced CANCELLED after a CANCELLED "Cancelling" is announced (forced transitions count).

    Prefect goes through the HTTP API with ``force=True``; here the orchestrator
    is forced directly, with a minimal flow policy that includes the transform.
    """

    class InstrumentedMinimalFlowPolicy(BaseOrchestrationPolicy):
        @staticmethod
        def priority() -> Sequence[RuleClass]:
            rules = tuple(MinimalFlowPolicy.priority())
            if InstrumentFlowRunStateTransitions in rules:
                return rules
            return (*rules, InstrumentFlowRunStateTransitions)

    orchestrator = Orchestrator(
        policies=dataclasses.replace(default_policies(), minimal_flow=InstrumentedMinimalFlowPolicy)
    )
    run = await create_flow_run(store)
    await orchestrator.set_flow_run_state(
        store, run, State(type=StateType.CANCELLED, name="Cancelling"), force=True
    )
    start_of_test = utcnow()

    ctx = await orchestrator.set_flow_run_state(
        store, run, State(type=StateType.CANCELLED), force=True
    )

    assert ctx.response_status == SetStateStatus.ACCEPT
    assert run.state is not None
    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Cancelled"
    assert start_of_test <= dt.datetime.fromisoformat(event["occurred"]) <= utcnow()
    assert event["resource"] == {
        "prefect.resource.id": f"prefect.flow-run.{run.id}",
        "prefect.resource.name": run.name,
        "prefect.run-count": "0",
        "prefect.state-message": "",
        "prefect.state-name": "Cancelled",
        "prefect.state-timestamp": run.state.timestamp.isoformat(),
        "prefect.state-type": "CANCELLED",
    }
