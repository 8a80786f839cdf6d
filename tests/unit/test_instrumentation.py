"""InstrumentFlowRunStateTransitions: flow-run state changes become events in the outbox.

Ported from Prefect's ``tests/server/orchestration/test_flow_run_instrumentation_policies.py``
(reference §5.5), keeping its test names. The event is read from
``context.outbox`` instead of an asserting events client. Prefect's tests on
provenance creators, work queues/pools and the related-resource cache have no
counterpart here (Arbiter has none of those); the subflow test replaces the
cache test for subflow runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest

from rules import instrumentation
from rules.base import ALL_ORCHESTRATION_STATES, FlowRunOrchestrationRule
from rules.context import FlowOrchestrationContext, OrchestrationContext, TaskOrchestrationContext
from rules.engine import Orchestrator, default_policies
from rules.instrumentation import InstrumentFlowRunStateTransitions, state_payload
from rules.memory import InMemoryStore
from rules.policies import MinimalFlowPolicy
from rules.policy import BaseOrchestrationPolicy, RuleClass
from rules.results import SetStateStatus
from schemas.runs import FlowRun
from schemas.states import State, StateDetails, StateType, utcnow
from tests.factories import create_flow_run, create_task_run

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


@pytest.fixture
async def flow_run(store: InMemoryStore) -> FlowRun:
    return await create_flow_run(store)


async def test_instrumenting_a_flow_run_state_change(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """P → R emits one "prefect.flow-run.Running" event describing the run and its flow."""
    start_of_test = utcnow()
    ctx = pending_to_running(store, flow_run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    event = only_event(ctx)
    assert ctx.proposed_state is not None
    assert event["event"] == "prefect.flow-run.Running"
    assert start_of_test <= dt.datetime.fromisoformat(event["occurred"]) <= utcnow()
    assert event["resource"] == {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name,
        "prefect.run-count": "0",
        "prefect.state-message": "",
        "prefect.state-name": "Running",
        "prefect.state-timestamp": ctx.proposed_state.timestamp.isoformat(),
        "prefect.state-type": "RUNNING",
    }
    assert event["related"] == [
        {
            "prefect.resource.id": f"prefect.flow.{flow_run.flow_name}",
            "prefect.resource.role": "flow",
            "prefect.resource.name": flow_run.flow_name,
        }
    ]


async def test_flow_run_state_change_events_capture_order_on_short_gaps(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """An event within five minutes of the previous state names it in ``follows``."""
    pending = State(type=StateType.PENDING, timestamp=utcnow() - dt.timedelta(minutes=2))
    first = await instrument(
        flow_context(store, flow_run, None, pending), (None, StateType.PENDING)
    )
    running = State(type=StateType.RUNNING)

    second = await instrument(flow_context(store, flow_run, pending, running), RUNNING_TRANSITION)

    assert only_event(first)["event"] == "prefect.flow-run.Pending"
    event = only_event(second)
    assert event["event"] == "prefect.flow-run.Running"
    assert event["id"] == str(running.id)
    assert event["follows"] == str(pending.id)


async def test_flow_run_state_change_events_do_not_capture_order_on_long_gaps(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """A predecessor older than five minutes is not chained."""
    pending = State(type=StateType.PENDING, timestamp=utcnow() - dt.timedelta(minutes=15))
    await instrument(flow_context(store, flow_run, None, pending), (None, StateType.PENDING))
    running = State(type=StateType.RUNNING)

    ctx = await instrument(flow_context(store, flow_run, pending, running), RUNNING_TRANSITION)

    event = only_event(ctx)
    assert event["id"] == str(running.id)
    assert event["follows"] is None


async def test_flow_run_state_change_events_do_not_capture_order_on_initial_transition(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """The first state of a run follows nothing."""
    pending = State(type=StateType.PENDING)

    ctx = await instrument(flow_context(store, flow_run, None, pending), (None, StateType.PENDING))

    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Pending"
    assert event["id"] == str(pending.id)
    assert event["follows"] is None


async def test_instrumenting_a_flow_run_with_no_flow(store: InMemoryStore) -> None:
    """A run without a known flow still emits its event, with no related flow."""
    run = await create_flow_run(store)
    run.flow_name = ""
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Running"
    assert event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run.id}"
    assert event["related"] == []


async def test_instrumenting_a_flow_run_includes_state_in_payload(
    store: InMemoryStore, flow_run: FlowRun
) -> None:
    """The payload has the intended transition and the essentials of both states."""
    proposed = State(type=StateType.RUNNING, name="custom", message="foo")

    ctx = await instrument(flow_context(store, flow_run, None, proposed), (None, StateType.RUNNING))

    assert only_event(ctx)["payload"] == {
        "intended": {"from": None, "to": "RUNNING"},
        "initial_state": None,
        "validated_state": {"type": "RUNNING", "name": "custom", "message": "foo"},
    }


async def test_instrumenting_a_deployed_flow_run_state_change(store: InMemoryStore) -> None:
    """A deployed run relates its flow, its deployment and its tags, in that order."""
    deployment_id = uuid.uuid4()
    run = await create_flow_run(store, deployment_id=deployment_id, tags=["test"])
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    assert only_event(ctx)["related"] == [
        {
            "prefect.resource.id": "prefect.flow.a-flow",
            "prefect.resource.role": "flow",
            "prefect.resource.name": "a-flow",
        },
        {
            "prefect.resource.id": f"prefect.deployment.{deployment_id}",
            "prefect.resource.role": "deployment",
        },
        {"prefect.resource.id": "prefect.tag.test", "prefect.resource.role": "tag"},
    ]


async def test_instrumenting_a_flow_with_tags(store: InMemoryStore) -> None:
    """Tags of the run and of its parent task run are related once each, sorted."""
    parent = await create_task_run(store, flow_run_id=None, tags=["task-run-one", "common-one"])
    run = await create_flow_run(
        store,
        deployment_id=uuid.uuid4(),
        parent_task_run_id=parent.id,
        tags=["flow-run-one", "common-one"],
    )
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    related = only_event(ctx)["related"]
    assert len(related) == 6  # the flow, the deployment, the parent task run and 3 tags
    assert [r["prefect.resource.id"] for r in related if r["prefect.resource.role"] == "tag"] == [
        "prefect.tag.common-one",
        "prefect.tag.flow-run-one",
        "prefect.tag.task-run-one",
    ]


async def test_instrumenting_a_subflow_run_relates_its_parent_task_run(
    store: InMemoryStore,
) -> None:
    """A subflow's event names the task run that stands for it in the parent flow."""
    parent = await create_task_run(store, flow_run_id=None)
    run = await create_flow_run(store, parent_task_run_id=parent.id)
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    assert only_event(ctx)["related"][-1] == {
        "prefect.resource.id": f"prefect.task-run.{parent.id}",
        "prefect.resource.role": "task-run",
        "prefect.resource.name": parent.name,
    }


async def test_related_tags_are_capped(
    store: InMemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tags fill the related resources up to the maximum, keeping one slot spare."""
    monkeypatch.setattr(instrumentation, "MAXIMUM_RELATED_RESOURCES", 4)
    run = await create_flow_run(store, tags=["d", "c", "b", "a"])
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    related = only_event(ctx)["related"]
    assert [r["prefect.resource.id"] for r in related] == [
        "prefect.flow.a-flow",
        "prefect.tag.a",
        "prefect.tag.b",
    ]


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


async def test_event_body_is_plain_json(store: InMemoryStore, flow_run: FlowRun) -> None:
    """The body survives a JSON round trip unchanged: no datetimes or UUIDs left in it."""
    ctx = flow_context(
        store,
        flow_run,
        State(type=StateType.PENDING),
        State(type=StateType.PAUSED, state_details=StateDetails(pause_reschedule=True)),
    )

    ctx = await instrument(ctx, (StateType.PENDING, StateType.PAUSED))

    event = only_event(ctx)
    assert json.loads(json.dumps(event)) == event


async def test_resource_state_message_is_truncated(
    store: InMemoryStore, flow_run: FlowRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state-message label is truncated like the payload's message."""
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 10)
    message = "12345" + "x" * 40 + "ghijk"
    proposed = State(type=StateType.FAILED, message=message)

    ctx = await instrument(flow_context(store, flow_run, None, proposed), (None, StateType.FAILED))

    event = only_event(ctx)
    expected = "12345...40 additional characters...ghijk"
    assert event["resource"]["prefect.state-message"] == expected
    assert event["payload"]["validated_state"]["message"] == expected


TRUNCATION_CASES = [
    (None, None),
    ("", None),
    ("a", "a"),
    ("heyyy", "heyyy"),
    ("12345678901", "12345678901"),
    ("123456789012", "123456789012"),  # the cut would be longer than the message
    (
        "12345xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxghijk",
        "12345...39 additional characters...ghijk",
    ),
    (
        "12345xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxghijk",
        "12345...40 additional characters...ghijk",
    ),
]


@pytest.fixture
def odd_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 50_000 < instrumentation.TRUNCATE_STATE_MESSAGES_AT < 1_000_000
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 11)


@pytest.fixture
def even_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 50_000 < instrumentation.TRUNCATE_STATE_MESSAGES_AT < 1_000_000
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 10)


@pytest.mark.usefixtures("odd_truncation")
@pytest.mark.parametrize(("message", "expected"), TRUNCATION_CASES)
def test_truncating_state_messages_at_odd_length(message: str | None, expected: str | None) -> None:
    """Long messages keep their head and tail; an empty message is left out."""
    payload = state_payload(State(type=StateType.PENDING, name="Pending", message=message))

    assert payload is not None
    assert payload.get("message") == expected


@pytest.mark.usefixtures("even_truncation")
@pytest.mark.parametrize(("message", "expected"), TRUNCATION_CASES)
def test_truncating_state_messages_at_even_length(
    message: str | None, expected: str | None
) -> None:
    """The same with an even limit."""
    payload = state_payload(State(type=StateType.PENDING, name="Pending", message=message))

    assert payload is not None
    assert payload.get("message") == expected


def test_state_payload_paused_state() -> None:
    """A PAUSED state's payload says whether it reschedules."""
    payload = state_payload(
        State(
            type=StateType.PAUSED,
            name="Paused",
            state_details=StateDetails(pause_reschedule=True),
        )
    )

    assert payload is not None
    assert payload["pause_reschedule"] == "true"
