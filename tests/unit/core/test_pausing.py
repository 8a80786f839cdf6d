"""Pausing, suspending and resuming flow runs (``rules/core/pausing.py``).

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 74-86): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.base import (
    StateTypeOrNone,
)
from arbiter.rules.core.pausing import HandlePausingFlows, HandleResumingPausedFlows
from arbiter.rules.results import (
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import State, StateDetails, StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    NOW,
    apply_rules,
    frozen_orchestrator,
    type_id,
)


def paused_state(
    *,
    pause_key: str | None = None,
    timeout_s: int | None = None,
    reschedule: bool = False,
    name: str = "",
) -> State:
    """Prefect's ``Paused(...)`` constructor, stamped on the frozen clock."""
    return State(
        type=StateType.PAUSED,
        name=name,
        timestamp=NOW,
        state_details=StateDetails(
            pause_key=pause_key,
            pause_timeout=NOW + dt.timedelta(seconds=timeout_s) if timeout_s else None,
            pause_reschedule=reschedule,
        ),
    )


class TestPausingFlows:
    transition = (StateType.RUNNING, StateType.PAUSED)

    async def test_can_not_nonblocking_pause_subflows(self, store: AdminStore) -> None:
        """A subflow cannot suspend, even with a deployment: its parent holds the process.

        Prefect's test leaves the parent unset (a comparison instead of an
        assignment) and trips on the missing deployment; this one sets both.
        """
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, deployment_id=uuid.uuid4()
        )
        ctx.proposed_state = paused_state(reschedule=True)
        ctx.run.parent_task_run_id = uuid.uuid4()

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(reason="Cannot pause subflows.")

    async def test_can_not_nonblocking_pause_flows_with_deployments_with_reschedule_flag(
        self, store: AdminStore
    ) -> None:
        """A run without a deployment cannot suspend (Prefect's name says the opposite)."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(
            reason="Cannot pause flows without a deployment."
        )

    async def test_can_nonblocking_pause_flows_with_deployments_with_reschedule_flag(
        self, store: AdminStore
    ) -> None:
        """A deployed run can suspend."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, deployment_id=uuid.uuid4()
        )
        ctx.proposed_state = paused_state(reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_updates_pause_key_tracker(self, store: AdminStore) -> None:
        """An accepted pause records its key on the run."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", timeout_s=1000)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert "hello" in ctx.run.empirical_policy.pause_keys

    async def test_defaults_pause_key_to_random_uuid(self, store: AdminStore) -> None:
        """A pause without a key records a random UUID (Prefect's test passes a key)."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(timeout_s=1000)
        assert len(ctx.run.empirical_policy.pause_keys) == 0

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        (key,) = ctx.run.empirical_policy.pause_keys
        assert uuid.UUID(key)

    async def test_does_not_permit_repeat_pauses(self, store: AdminStore) -> None:
        """The same pause key fires once per run."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", timeout_s=1000)
        ctx = await apply_rules(ctx, [HandlePausingFlows])
        assert ctx.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(store, "flow", *self.transition, run_override=ctx.run)
        ctx2.proposed_state = paused_state(pause_key="hello", timeout_s=1000)
        ctx2 = await apply_rules(ctx2, [HandlePausingFlows])

        assert ctx2.response_status == SetStateStatus.REJECT
        assert ctx2.response_details == StateRejectDetails(reason="This pause has already fired.")
        assert ctx2.validated_state_type == StateType.RUNNING

    @pytest.mark.parametrize("initial_state_type", ALL_STATES, ids=type_id)
    async def test_can_only_pause_running_flows(
        self, store: AdminStore, initial_state_type: StateTypeOrNone
    ) -> None:
        """No state aborts, RUNNING pauses, anything else is null-rejected."""
        ctx = await initialize_orchestration(
            store, "flow", initial_state_type, StateType.PAUSED, deployment_id=uuid.uuid4()
        )

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        if initial_state_type is None:
            assert ctx.response_status == SetStateStatus.ABORT
            assert ctx.response_details == StateAbortDetails(
                reason="Cannot pause flows with no state."
            )
        elif initial_state_type == StateType.RUNNING:
            assert ctx.response_status == SetStateStatus.ACCEPT
        else:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.response_details == StateRejectDetails(
                reason="Cannot pause flows that are not currently running."
            )
            assert ctx.validated_state_type == initial_state_type

    async def test_suspensions_are_worded_as_such(self, store: AdminStore) -> None:
        """A "Suspended" proposal is refused with "suspend" in the reason."""
        ctx = await initialize_orchestration(store, "flow", StateType.PENDING, StateType.PAUSED)
        ctx.proposed_state = paused_state(reschedule=True, name="Suspended")

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_details == StateRejectDetails(
            reason="Cannot suspend flows that are not currently running."
        )

    async def test_refused_pause_records_no_key(self, store: AdminStore) -> None:
        """A pause that is not written leaves the pause keys untouched."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.run.empirical_policy.pause_keys == set()


class TestResumingFlows:
    async def test_cannot_leave_nonblocking_pausing_state_without_a_deployment(
        self, store: AdminStore
    ) -> None:
        """A suspended run is resumed through its deployment, so without one it stays PAUSED."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={
                "pause_timeout": NOW + dt.timedelta(minutes=5),
                "pause_reschedule": True,
            },
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cannot reschedule a running flow run without a deployment."
        )
        assert ctx.validated_state_type == StateType.PAUSED

    async def test_can_leave_blocking_pausing_state_without_a_deployment(
        self, store: AdminStore
    ) -> None:
        """A blocking pause resumes in the same process, no deployment needed."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize("proposed_state_type", CANONICAL_STATES, ids=type_id)
    async def test_transitions_out_of_pausing_states_are_restricted(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """PAUSED resumes into RUNNING, SCHEDULED or a final state; anything else is refused."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.PAUSED, proposed_state_type, deployment_id=uuid.uuid4()
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        permitted_resuming_states = [
            StateType.RUNNING,
            StateType.COMPLETED,
            StateType.SCHEDULED,
            StateType.FAILED,
            StateType.CRASHED,
            StateType.CANCELLED,
        ]
        if proposed_state_type in permitted_resuming_states:
            assert ctx.response_status == SetStateStatus.ACCEPT
        else:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.validated_state_type == StateType.PAUSED

    async def test_cannot_leave_pausing_state_if_pause_has_timed_out(
        self, store: AdminStore
    ) -> None:
        """A resume after the pause timed out fails the run instead."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW - dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="The flow run pause has timed out and can no longer resume."
        )
        assert ctx.validated_state is not None
        assert ctx.validated_state.type == StateType.FAILED
        assert ctx.validated_state.message == "The flow was running and never resumed."

    async def test_allows_leaving_pausing_state(self, store: AdminStore) -> None:
        """A resume within the timeout is accepted."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_marks_flow_run_as_resuming_upon_leaving_paused_state(
        self, store: AdminStore
    ) -> None:
        """A resumed run is flagged so its next RUNNING is not a new attempt."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.resuming

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.PENDING, StateType.PAUSED, StateType.CANCELLING],
        ids=type_id,
    )
    async def test_refusal_renders_state_types_as_prefect_does(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """The reason names both types as ``StateType.X`` (Prefect on Python ≥ 3.11)."""
        ctx = await initialize_orchestration(store, "flow", StateType.PAUSED, proposed_state_type)

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_details == StateRejectDetails(
            reason=f"This run cannot transition to the StateType.{proposed_state_type.name} "
            "state from the StateType.PAUSED state."
        )

    async def test_resuming_is_flagged_even_after_a_refused_resume(self, store: AdminStore) -> None:
        """Prefect's after-hook also runs after the rule's own null reject (reference §6.10)."""
        ctx = await initialize_orchestration(store, "flow", StateType.PAUSED, StateType.PENDING)

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.empirical_policy.resuming is True

    async def test_suspended_resume_without_deployment_names_the_proposed_state(
        self, store: AdminStore
    ) -> None:
        """The refusal names the proposed state in lower case ("resuming")."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.SCHEDULED,
            proposed_state_name="Resuming",
            initial_details={"pause_reschedule": True},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_details == StateRejectDetails(
            reason="Cannot reschedule a resuming flow run without a deployment."
        )
