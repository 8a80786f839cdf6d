"""Flow retries (``rules/core/retries.py``): automatic retries of a failing flow run,
and manual retries of a finished one.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 11-19): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.core.retries import RetryFailedFlows
from arbiter.rules.core.terminal import (
    HandleFlowTerminalStateTransitions,
)
from arbiter.rules.results import (
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.runs import FlowRunPolicy
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    NOW,
    apply_rules,
    frozen_orchestrator,
)


class TestFlowRetryingRule:
    async def test_retries(self, store: AdminStore) -> None:
        """A failure with retries left is rejected into SCHEDULED AwaitingRetry."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 1
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.SCHEDULED

    async def test_stops_retrying_eventually(self, store: AdminStore) -> None:
        """Once run_count exceeds retries the failure is written."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_sets_retry_type(self, store: AdminStore) -> None:
        """An automatic retry is marked "in_process"."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run_settings.retries = 3

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.empirical_policy.retry_type == "in_process"

    async def test_clears_retry_type_on_exhausted_retries(self, store: AdminStore) -> None:
        """Exhausted retries clear a previous retry_type."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run.empirical_policy = FlowRunPolicy(retries=1, retry_type="in_process")

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.retry_type is None

    async def test_awaiting_retry_is_due_after_retry_delay_and_carries_the_failure(
        self, store: AdminStore
    ) -> None:
        """AwaitingRetry is due after retry_delay and keeps the failure's message and data."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.RUNNING,
            StateType.FAILED,
            orchestrator=frozen_orchestrator(),
            proposed_state_data={"type": "unpersisted"},
        )
        assert ctx.proposed_state is not None
        ctx.proposed_state.message = "boom"
        ctx.run.run_count = 1
        ctx.run.empirical_policy = FlowRunPolicy(retries=2, retry_delay=30)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        validated = ctx.validated_state
        assert validated is not None
        assert (validated.type, validated.name) == (StateType.SCHEDULED, "AwaitingRetry")
        assert validated.state_details.scheduled_time == NOW + dt.timedelta(seconds=30)
        assert (validated.message, validated.data) == ("boom", {"type": "unpersisted"})
        assert ctx.response_details == StateRejectDetails(reason="Retrying")

    async def test_retry_resets_pause_bookkeeping(self, store: AdminStore) -> None:
        """A retried flow may pause again: pause keys and the resuming flag are cleared."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 1
        ctx.run.empirical_policy = FlowRunPolicy(retries=1, pause_keys={"a"}, resuming=True)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.run.empirical_policy.pause_keys == set()
        assert ctx.run.empirical_policy.resuming is False

    async def test_no_retries_configured_accepts_the_failure(self, store: AdminStore) -> None:
        """Without a retries setting the failure is final at once."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED


class TestManualFlowRetries:
    async def test_can_manual_retry_with_arbitrary_state_name(self, store: AdminStore) -> None:
        """FAILED → any SCHEDULED state is a manual retry when the run has a deployment."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            proposed_state_name="FooBar",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 2
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 2

    async def test_cannot_manual_retry_without_deployment(self, store: AdminStore) -> None:
        """Nothing could pick up a rescheduled ad-hoc run, so it is aborted."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=1,
            proposed_state_name="AwaitingRetry",
        )
        ctx.run.run_count = 2

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(
            reason="Cannot reschedule a run without an associated deployment."
        )
        assert ctx.run.run_count == 2

    async def test_manual_retrying_works_even_when_exceeding_max_retries(
        self, store: AdminStore
    ) -> None:
        """A manual retry ignores the automatic retry budget."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=1,
            proposed_state_name="AwaitingRetry",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 2

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 2

    async def test_manual_retrying_bypasses_terminal_state_protection(
        self, store: AdminStore
    ) -> None:
        """A manual retry keeps the run's attempt count."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=10,
            proposed_state_name="AwaitingRetry",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 3

    @pytest.mark.parametrize(
        ("proposed_state_type", "expected_retry_type"),
        [(StateType.SCHEDULED, "reschedule"), (StateType.FAILED, None)],
        ids=["SCHEDULED", "FAILED"],
    )
    async def test_manual_retry_updates_retry_type(
        self,
        store: AdminStore,
        proposed_state_type: StateType,
        expected_retry_type: str | None,
    ) -> None:
        """Leaving FAILED for SCHEDULED is a "reschedule"; FAILED → FAILED changes nothing."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            proposed_state_type,
            flow_retries=1,
            deployment_id=uuid.uuid4(),
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.retry_type == expected_retry_type
