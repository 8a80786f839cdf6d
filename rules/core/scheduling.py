"""Scheduled time: carried from SCHEDULED into PENDING, enforced before RUNNING.

Both rules govern flow and task runs alike.
"""

from __future__ import annotations

import math

from arbiter.rules.base import GenericOrchestrationRule, states
from arbiter.rules.context import OrchestrationContext
from arbiter.schemas.states import State, StateType


class CopyScheduledTime(GenericOrchestrationRule):
    """A PENDING run remembers when it was scheduled to start.

    Executors propose PENDING without a scheduled time; copying the SCHEDULED
    state's time onto it lets WaitForScheduledTime hold back a run that was
    submitted early (PENDING → RUNNING), not only one that jumps straight from
    SCHEDULED to RUNNING. A scheduled time the executor did send wins.
    """

    FROM_STATES = states(StateType.SCHEDULED)
    TO_STATES = states(StateType.PENDING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext,  # type: ignore[type-arg]
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if not proposed_state.state_details.scheduled_time:
            # state_details is shared with the real proposed state: this write sticks.
            proposed_state.state_details.scheduled_time = initial_state.state_details.scheduled_time


class WaitForScheduledTime(GenericOrchestrationRule):
    """A run starts no earlier than its scheduled time, by the server's clock.

    Executors' clocks drift and workers poll ahead of time; a RUNNING proposed
    before the SCHEDULED (or PENDING) state's scheduled time is not written,
    and the executor is told to wait the remaining whole seconds (rounded to
    the nearest second) and propose again.
    """

    FROM_STATES = states(StateType.SCHEDULED, StateType.PENDING)
    TO_STATES = states(StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext,  # type: ignore[type-arg]
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        scheduled_time = initial_state.state_details.scheduled_time
        if scheduled_time is None:
            return
        delay = scheduled_time - context.now()
        # timedelta.microseconds is never negative, so this rounds to the nearest second.
        delay_seconds = math.floor(delay.total_seconds()) + round(delay.microseconds / 1e6)
        if delay_seconds > 0:
            await self.delay_transition(delay_seconds, reason="Scheduled time is in the future")
