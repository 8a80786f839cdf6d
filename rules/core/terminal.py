"""Protection of a flow run that has reached a terminal state, and of its result.

The task-run counterpart, HandleTaskTerminalStateTransitions, lives in
``rules.core.task_terminal``: flows and tasks differ in what leaving a terminal
state resets (pause bookkeeping for flows, ``run_count`` for tasks) and in
which COMPLETED results they protect.
"""

from __future__ import annotations

from pydantic import JsonValue

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    TERMINAL_TYPES,
    FlowRunOrchestrationRule,
    StateTypeOrNone,
    states,
)
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.schemas.runs import FlowRunPolicy
from arbiter.schemas.states import State, StateType

_NEVER_AFTER_TERMINAL = states(StateType.CANCELLING, StateType.PAUSED, StateType.CRASHED)

DATA_LOSS_REASON = (
    "Cannot overwrite a COMPLETED state that carries persisted result data with one that does not."
)


def has_persisted_result(data: JsonValue) -> bool:
    """Whether state ``data`` is a reference to a result stored somewhere (Prefect's check).

    A result record is a dict; it counts as persisted unless its ``type`` is
    ``"unpersisted"`` (a dict without ``type``, such as result-record metadata,
    is persisted). Scalars and lists are inline values, never persisted
    results. Truthiness is the caller's business: Prefect tests ``data`` for
    truth before calling this on an initial state, but not on a proposed one.
    """
    return isinstance(data, dict) and data.get("type") != "unpersisted"


def _discards_persisted_result(initial_state: State, proposed_state: State) -> bool:
    """COMPLETED → COMPLETED where only the current state points at a persisted result."""
    return (
        initial_state.type is StateType.COMPLETED
        and proposed_state.type is StateType.COMPLETED
        and bool(initial_state.data)
        and has_persisted_result(initial_state.data)
        and not has_persisted_result(proposed_state.data)
    )


class HandleFlowTerminalStateTransitions(FlowRunOrchestrationRule):
    """A finished flow run keeps its outcome; leaving it is a deliberate rerun.

    - CANCELLING, PAUSED or CRASHED after a terminal state is aborted: a late
      crash report or a cancellation racing with completion must not overwrite
      the recorded outcome.
    - A COMPLETED run whose result is persisted cannot go back to a non-final
      state (null reject), and a second COMPLETED without a persisted result
      cannot replace it: an executor finishing late, or a stale retry, must
      not discard a result that downstream consumers may already have read.
    - SCHEDULED needs a deployment (aborted otherwise): nothing would ever
      pick up a rescheduled ad-hoc run.
    - Any other move to a non-final state (a manual retry or rerun) starts a
      new series of attempts: pause keys and the resuming flag are cleared and
      ``retry_type`` becomes "reschedule" (SCHEDULED) or None. ``run_count`` is
      kept, so the attempts of a manually retried flow keep counting.

    If a later rule changes the transition, ``cleanup`` restores the
    ``empirical_policy`` snapshotted on entry.
    """

    FROM_STATES = TERMINAL_TYPES
    TO_STATES = ALL_ORCHESTRATION_STATES

    def __init__(
        self,
        context: FlowOrchestrationContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self._original_policy: FlowRunPolicy | None = None

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        run = context.run
        self._original_policy = run.empirical_policy.model_copy(deep=True)

        if proposed_state.type in _NEVER_AFTER_TERMINAL:
            await self.abort_transition(
                reason=f"Run is already in terminal state {initial_state.type.value}."
            )
            return

        if (
            initial_state.type is StateType.COMPLETED
            and not proposed_state.is_final()
            and initial_state.data
            and has_persisted_result(initial_state.data)
        ):
            await self.reject_transition(state=None, reason="Run is already COMPLETED.")
            return

        if _discards_persisted_result(initial_state, proposed_state):
            await self.reject_transition(state=None, reason=DATA_LOSS_REASON)
            return

        if proposed_state.type is StateType.SCHEDULED and run.deployment_id is None:
            await self.abort_transition(
                reason="Cannot reschedule a run without an associated deployment."
            )
            return

        if not proposed_state.is_final():
            run.empirical_policy = run.empirical_policy.model_copy(
                update={
                    "resuming": False,
                    "pause_keys": set(),
                    "retry_type": (
                        "reschedule" if proposed_state.type is StateType.SCHEDULED else None
                    ),
                }
            )

    async def cleanup(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if self._original_policy is not None:
            context.run.empirical_policy = self._original_policy


class PreventResultDataLoss(FlowRunOrchestrationRule):
    """A COMPLETED flow run's persisted result is never replaced by a COMPLETED without one.

    This is the data-loss half of HandleFlowTerminalStateTransitions, kept in
    the minimal (forced) policy too: a forced COMPLETED sent by a second
    executor, or by a client retrying a request whose first attempt already
    stored the result, would otherwise overwrite the result reference with
    nothing (null reject, the current state is returned). Inline data on the
    current state (scalars, lists) is not a persisted result and is not
    protected.
    """

    FROM_STATES = TERMINAL_TYPES
    TO_STATES = TERMINAL_TYPES

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if _discards_persisted_result(initial_state, proposed_state):
            await self.reject_transition(state=None, reason=DATA_LOSS_REASON)
