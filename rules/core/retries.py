"""Flow retries: a failing flow run with retries left is rescheduled in process.

Task retries live in ``rules.core.task_retries``.
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.base import FlowRunOrchestrationRule, states
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.schemas.states import State, StateDetails, StateType


class RetryFailedFlows(FlowRunOrchestrationRule):
    """A failing flow run with retries left is rescheduled instead of failing.

    While ``run_count <= retries`` (``retries=N`` allows N + 1 attempts), the
    FAILED proposal is rejected into SCHEDULED "AwaitingRetry", due after
    ``retry_delay`` seconds and carrying the failure's message and data; the
    run's pause bookkeeping is reset (a retried flow may pause again at the
    same points) and ``retry_type`` becomes "in_process". The budget is counted
    by the server (``run_count`` grows on every entry into RUNNING), so an
    executor that restarts cannot reset it. Once retries are exhausted the
    failure is written and ``retry_type`` cleared, so a later retry of the
    run by other means (a UI rerun, infrastructure) starts clean.
    """

    FROM_STATES = states(StateType.RUNNING)
    TO_STATES = states(StateType.FAILED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        run = context.run
        retries = run.empirical_policy.retries
        if retries is None or run.run_count > retries:
            run.empirical_policy = run.empirical_policy.model_copy(update={"retry_type": None})
            return

        now = context.now()
        retry_at = now + dt.timedelta(seconds=run.empirical_policy.retry_delay or 0)
        run.empirical_policy = run.empirical_policy.model_copy(
            update={"resuming": False, "pause_keys": set(), "retry_type": "in_process"}
        )
        awaiting_retry = State(
            type=StateType.SCHEDULED,
            name="AwaitingRetry",
            timestamp=now,
            message=proposed_state.message,
            data=proposed_state.data,
            state_details=StateDetails(scheduled_time=retry_at),
        )
        await self.reject_transition(state=awaiting_retry, reason="Retrying")
