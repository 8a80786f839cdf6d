"""Protection of a task run that has reached a terminal state."""

from __future__ import annotations

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    TERMINAL_TYPES,
    StateTypeOrNone,
    TaskRunOrchestrationRule,
    states,
)
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.errors import OrchestrationError
from arbiter.schemas.states import State, StateType

_NEVER_AFTER_TERMINAL = states(StateType.CANCELLING, StateType.PAUSED, StateType.CRASHED)


class HandleTaskTerminalStateTransitions(TaskRunOrchestrationRule):
    """A finished task keeps its result; leaving a terminal state starts a new series of attempts.

    - CANCELLING, PAUSED or CRASHED after a terminal state is aborted: a late
      crash report or cancellation must not overwrite the recorded outcome.
    - A COMPLETED task whose result is persisted is never moved again (null
      reject, any target): a second executor finishing late, or a stale retry,
      cannot discard a result that downstream tasks may already have read.
    - Any other move to a non-final state (a flow retry, a manual rerun) resets
      ``run_count`` to 0 so the task gets its full retry budget again; when the
      parent flow is on a newer attempt than the one this task last ran in, the
      RUNNING state is renamed "Retrying".

    If a later rule changes the transition, ``cleanup`` restores ``run_count``.
    """

    FROM_STATES = TERMINAL_TYPES
    TO_STATES = ALL_ORCHESTRATION_STATES

    def __init__(
        self,
        context: TaskOrchestrationContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self._original_run_count: int | None = None

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        run = context.run
        self._original_run_count = run.run_count

        if proposed_state.type in _NEVER_AFTER_TERMINAL:
            await self.abort_transition(reason=f"Run is already {initial_state.type.value}.")
            return

        if initial_state.type is StateType.COMPLETED and _has_persisted_result(initial_state):
            await self.reject_transition(state=None, reason="This run is already completed.")
            return

        if not proposed_state.is_final():
            run.run_count = 0

        if proposed_state.type is StateType.RUNNING and run.flow_run_id is not None:
            flow_run = await context.flow_run()
            if flow_run is not None and run.flow_run_run_count < flow_run.run_count:
                await self.rename_state("Retrying")

    async def cleanup(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if self._original_run_count is not None:
            context.run.run_count = self._original_run_count


def _has_persisted_result(state: State) -> bool:
    """Whether a COMPLETED task state's data points at a persisted result.

    Prefect reads ``data.get("type")`` here, so data that is truthy but not a
    dict fails the transition (ABORT through the rule error path). We keep that
    outcome but raise a named error instead of an AttributeError.
    """
    data = state.data
    if not data:
        return False
    if not isinstance(data, dict):
        raise OrchestrationError(
            "Cannot tell whether the result of this COMPLETED task run is persisted: "
            f"its data is a {type(data).__name__}, not a result record."
        )
    return data.get("type") != "unpersisted"
