"""Pausing and suspending flow runs, and resuming them.

A *pause* (PAUSED, ``pause_reschedule`` False) keeps the flow's process alive
and blocking; a *suspension* (PAUSED named "Suspended", ``pause_reschedule``
True) exits the process and is resumed by rescheduling the run through its
deployment.

The reason of a refused resume interpolates the state types the way Prefect
does on Python ≥ 3.11, where an f-string renders an enum member as
``StateType.PENDING``. Our ``StateType`` is a ``StrEnum``, whose ``str()`` is
the bare value, so the reason is built explicitly from ``StateType.<name>``
to keep Prefect's wording byte for byte.
"""

from __future__ import annotations

import uuid

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    FlowRunOrchestrationRule,
    StateTypeOrNone,
    states,
)
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.schemas.states import State, StateType


def _verb(proposed_state: State) -> str:
    return "suspend" if proposed_state.name == "Suspended" else "pause"


def _enum_repr(state_type: StateType) -> str:
    """``StateType.PENDING``: how Prefect's f-string renders the enum on Python ≥ 3.11."""
    return f"StateType.{state_type.name}"


class HandlePausingFlows(FlowRunOrchestrationRule):
    """Only a RUNNING flow can pause, each pause fires once, and only deployments suspend.

    - No state: aborted. Not RUNNING: null-rejected (a pause request that
      arrives after the run moved on must not stop it).
    - Each pause point has a key (``pause_key``, or a random one); a key
      already recorded on the run is null-rejected, so a flow replaying its
      code after a resume does not pause again at the same point.
    - A suspension (``pause_reschedule``) exits the process, so the run must be
      rescheduled by its deployment: subflows and runs without a deployment
      cannot suspend (aborted).

    The key is recorded after the PAUSED state was written, and only then: a
    refused pause leaves no trace.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.PAUSED)

    def __init__(
        self,
        context: FlowOrchestrationContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self._pause_key: str | None = None

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if proposed_state is None:
            return
        verb = _verb(proposed_state)
        if initial_state is None:
            await self.abort_transition(reason=f"Cannot {verb} flows with no state.")
            return
        if initial_state.type is not StateType.RUNNING:
            await self.reject_transition(
                state=None, reason=f"Cannot {verb} flows that are not currently running."
            )
            return

        key = proposed_state.state_details.pause_key
        self._pause_key = key if key is not None else str(uuid.uuid4())
        if self._pause_key in context.run.empirical_policy.pause_keys:
            await self.reject_transition(state=None, reason=f"This {verb} has already fired.")
            return

        if proposed_state.state_details.pause_reschedule:
            if context.run.parent_task_run_id is not None:
                await self.abort_transition(reason=f"Cannot {verb} subflows.")
                return
            if context.run.deployment_id is None:
                await self.abort_transition(reason=f"Cannot {verb} flows without a deployment.")
                return

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if self._pause_key is None:
            return
        policy = context.run.empirical_policy
        context.run.empirical_policy = policy.model_copy(
            update={"pause_keys": policy.pause_keys | {self._pause_key}}
        )


class HandleResumingPausedFlows(FlowRunOrchestrationRule):
    """A paused run resumes only into RUNNING, SCHEDULED or a final state, and only in time.

    - PENDING, PAUSED or CANCELLING out of PAUSED are null-rejected: they are
      not ways to resume (a stale submission or a second pause).
    - A suspended run (``pause_reschedule``) can only be resumed through a
      deployment: without one, null reject.
    - Past its ``pause_timeout`` the pause has expired: whoever proposes the
      resume (a late approval racing the timeout) gets the run rejected into
      FAILED, since the flow has given up waiting.

    After the transition the run is flagged ``resuming`` so the next RUNNING
    does not count as a new attempt. As in Prefect, the flag is set after any
    exit where this rule stayed valid, including its own null reject and the
    timeout → FAILED reject (its TO_STATES contains every type and None).
    """

    FROM_STATES = states(StateType.PAUSED)
    TO_STATES = ALL_ORCHESTRATION_STATES

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        resumes = proposed_state.type in (StateType.RUNNING, StateType.SCHEDULED)
        if not (resumes or proposed_state.is_final()):
            await self.reject_transition(
                state=None,
                reason=f"This run cannot transition to the {_enum_repr(proposed_state.type)} "
                f"state from the {_enum_repr(initial_state.type)} state.",
            )
            return

        verb = _verb(proposed_state)
        display_name = (proposed_state.name or proposed_state.type.value).lower()
        details = initial_state.state_details
        if details.pause_reschedule and context.run.deployment_id is None:
            await self.reject_transition(
                state=None,
                reason=f"Cannot reschedule a {display_name} flow run without a deployment.",
            )
            return

        now = context.now()
        if details.pause_timeout is not None and details.pause_timeout < now:
            await self.reject_transition(
                state=State(
                    type=StateType.FAILED,
                    timestamp=now,
                    message=f"The flow was {display_name} and never resumed.",
                ),
                reason=f"The flow run {verb} has timed out and can no longer resume.",
            )

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        context.run.empirical_policy = context.run.empirical_policy.model_copy(
            update={"resuming": True}
        )
