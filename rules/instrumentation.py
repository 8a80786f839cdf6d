"""Observability: every written flow-run state becomes a ``prefect.flow-run.<name>`` event.

The event goes to ``context.outbox``; the worker publishes the outbox only
after the transaction that wrote the state commits, so subscribers can always
read the new state and a rolled-back transition never emits anything.

The event has Prefect's shape (``id``, ``event``, ``occurred``, ``follows``,
``resource``, ``related``, ``payload``). Where Arbiter knows less than a
Prefect server, the related resources say less:

- the flow is identified by its *name* (``prefect.flow.<flow_name>``), since
  there is no flow table and so no flow id; a run without a flow name has no
  flow resource (Prefect's "flow not found" case);
- the deployment carries only its id (no name, no tags: there is no
  deployment table yet);
- tags come from the flow run and its parent task run (Prefect also merges
  the flow's and the deployment's tags);
- there are no work queues, work pools or provenance (``created_by``), and
  nothing to cache, so none of those appear.

State messages are truncated once, at ``TRUNCATE_STATE_MESSAGES_AT``
characters, in the resource label and in the payload. (Prefect truncates the
states' messages first and then again while building the event, which can
rewrite the count of omitted characters; we truncate the original message.)
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.base import FlowRunUniversalTransform
from arbiter.rules.context import FlowOrchestrationContext, OutboxMessage
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateType

# Some state messages carry whole tracebacks or results: cap what an event carries.
# Read at call time, so tests can monkeypatch it.
TRUNCATE_STATE_MESSAGES_AT = 100_000

# Prefect's ``server.events.maximum_related_resources`` default; tags fill what is left.
MAXIMUM_RELATED_RESOURCES = 100

# Consecutive events closer than this are chained through ``follows`` so consumers can
# order them even when they arrive out of order; older predecessors need no hint.
_TIGHT_TIMING = dt.timedelta(minutes=5)

RelatedResource = dict[str, str]


def truncated_to(length: int, value: str | None) -> str:
    """``value`` cut in the middle to about ``length`` characters; None or "" → "".

    The kept head and tail are ``length // 2`` characters each; the cut is
    only made when the result is actually shorter than the original.
    """
    if not value:
        return ""
    if len(value) <= length:
        return value
    half = length // 2
    beginning, end = value[:half], value[-half:]
    omitted = len(value) - (len(beginning) + len(end))
    proposed = f"{beginning}...{omitted} additional characters...{end}"
    return proposed if len(proposed) < len(value) else value


def state_payload(state: State | None) -> dict[str, str] | None:
    """The essential string parts of a state, for an event payload."""
    if state is None:
        return None
    payload = {"type": state.type.value}
    if state.name:
        payload["name"] = state.name
    if state.message:
        payload["message"] = truncated_to(TRUNCATE_STATE_MESSAGES_AT, state.message)
    if state.type is StateType.PAUSED:
        payload["pause_reschedule"] = str(state.state_details.pause_reschedule).lower()
    return payload


def _timing_is_tight(occurred: dt.datetime, initial_state: State | None) -> bool:
    if initial_state is None:
        return False
    return -_TIGHT_TIMING < occurred - initial_state.timestamp < _TIGHT_TIMING


async def _related_resources(context: FlowOrchestrationContext) -> list[RelatedResource]:
    """Flow, deployment and parent task run, then the tags of the run and its parent task."""
    run: FlowRun = context.run
    related: list[RelatedResource] = []
    tags = set(run.tags)
    if run.flow_name:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{run.flow_name}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": run.flow_name,
            }
        )
    if run.deployment_id is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    if run.parent_task_run_id is not None:
        parent = await context.store.read_task_run(run.parent_task_run_id)
        if parent is not None:
            related.append(
                {
                    "prefect.resource.id": f"prefect.task-run.{parent.id}",
                    "prefect.resource.role": "task-run",
                    "prefect.resource.name": parent.name,
                }
            )
            tags |= set(parent.tags)
    # Keep one slot free, as Prefect does for the provenance resource.
    max_tags = max(0, MAXIMUM_RELATED_RESOURCES - len(related) - 1)
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(tags)[:max_tags]
    ]
    return related


async def flow_run_state_change_event(
    context: FlowOrchestrationContext, validated_state: State
) -> dict[str, object]:
    """The ``prefect.flow-run.<state name>`` event for the state this transition wrote."""
    run = context.run
    initial_state = context.initial_state
    occurred = validated_state.timestamp
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{run.id}",
        "prefect.resource.name": run.name,
        "prefect.run-count": str(run.run_count),
        "prefect.state-message": truncated_to(TRUNCATE_STATE_MESSAGES_AT, validated_state.message),
        "prefect.state-name": validated_state.name or "",
        "prefect.state-timestamp": validated_state.timestamp.isoformat(),
        "prefect.state-type": validated_state.type.value,
    }
    follows = (
        str(initial_state.id)
        if initial_state is not None and _timing_is_tight(occurred, initial_state)
        else None
    )
    return {
        # The state's id doubles as the event's id, so events order like states.
        "id": str(validated_state.id),
        "event": f"prefect.flow-run.{validated_state.name}",
        "occurred": occurred.isoformat(),
        "follows": follows,
        "resource": resource,
        "related": await _related_resources(context),
        "payload": {
            "intended": {
                "from": initial_state.type.value if initial_state is not None else None,
                "to": validated_state.type.value,
            },
            "initial_state": state_payload(initial_state),
            "validated_state": state_payload(validated_state),
        },
    }


class InstrumentFlowRunStateTransitions(FlowRunUniversalTransform):
    """Every state written for a flow run is announced as an event, exactly when it is written.

    Nothing is emitted when nothing was written (WAIT, ABORT, a null REJECT),
    so consumers never see a state that does not exist; a REJECT that writes
    a replacement state (AwaitingRetry, Cancelled...) announces the
    replacement. Forced transitions are announced too (the transform is in
    the minimal policy), otherwise a forced CANCELLED after CANCELLING would
    leave automations waiting forever. Task-run contexts emit nothing.
    """

    async def after_transition(self, context: FlowOrchestrationContext) -> None:
        validated_state = context.validated_state
        if context.proposed_state is None or validated_state is None:
            return
        if not isinstance(context, FlowOrchestrationContext):
            return
        event = await flow_run_state_change_event(context, validated_state)
        context.outbox.append(
            OutboxMessage(
                channel="event",
                routing_key=f"prefect.flow-run.{validated_state.name}",
                body=event,
                message_id=str(validated_state.id),
            )
        )
