"""Background task runs (``rules/core/background.py``): a deferred task keeps its
parameters and reaches a task worker once it is SCHEDULED.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 6-7): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from itertools import product

import pytest

from arbiter.rules.context import OutboxMessage, TaskOrchestrationContext
from arbiter.rules.core.background import CopyTaskParametersID, EnqueueScheduledTasks
from arbiter.rules.policy import RuleClass
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    TERMINAL_STATES,
    AbortingRule,
    apply_rules,
    transition_id,
)


class TestCopyTaskParametersID:
    @pytest.mark.parametrize(
        "intended_transition",
        list(
            product(
                [StateType.SCHEDULED, StateType.PENDING], [StateType.PENDING, StateType.RUNNING]
            )
        ),
        ids=transition_id,
    )
    async def test_task_parameters_id_copied_from_scheduled_to_pending(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """The initial state's task_parameters_id is carried onto the validated state."""
        parameters_id = uuid.uuid4()
        ctx = await initialize_orchestration(
            store,
            "task",
            *intended_transition,
            initial_details={"task_parameters_id": parameters_id},
        )

        ctx = await apply_rules(ctx, [CopyTaskParametersID])

        assert ctx.validated_state is not None
        assert ctx.validated_state.type == intended_transition[1]
        assert ctx.validated_state.state_details.task_parameters_id == parameters_id

    @pytest.mark.parametrize(
        "intended_transition",
        list(product([StateType.SCHEDULED, StateType.PENDING], TERMINAL_STATES)),
        ids=transition_id,
    )
    async def test_task_parameters_id_not_copied_for_other_transitions(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """The rule does not apply to transitions into anything but PENDING or RUNNING."""
        ctx = await initialize_orchestration(
            store,
            "task",
            *intended_transition,
            initial_details={"task_parameters_id": uuid.uuid4()},
        )

        rule = CopyTaskParametersID(ctx, *intended_transition)
        async with rule as ctx:
            await ctx.validate_proposed_state()

        assert await rule.invalid()
        assert ctx.validated_state is not None
        assert ctx.validated_state.state_details.task_parameters_id is None

    async def test_proposed_task_parameters_id_is_kept(self, store: AdminStore) -> None:
        """A task_parameters_id sent with the proposal is not overwritten."""
        proposed_id = uuid.uuid4()
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.SCHEDULED,
            StateType.PENDING,
            initial_details={"task_parameters_id": uuid.uuid4()},
            proposed_details={"task_parameters_id": proposed_id},
        )

        ctx = await apply_rules(ctx, [CopyTaskParametersID])

        assert ctx.validated_state is not None
        assert ctx.validated_state.state_details.task_parameters_id == proposed_id


class TestEnqueueScheduledTasks:
    async def _schedule(
        self,
        store: AdminStore,
        *,
        deferred: bool,
        name: str | None = None,
        extra_rules: Sequence[RuleClass] = (),
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.SCHEDULED,
            proposed_details={"deferred": deferred},
            proposed_state_name=name,
        )
        return await apply_rules(ctx, [EnqueueScheduledTasks, *extra_rules])

    async def test_deferred_scheduled_state_is_enqueued(self, store: AdminStore) -> None:
        """A written deferred SCHEDULED state puts one task_run message in the outbox."""
        ctx = await self._schedule(store, deferred=True)

        assert ctx.validated_state is not None
        assert ctx.outbox == [
            OutboxMessage(
                channel="task_run",
                routing_key="a-task",
                body={
                    "task_run_id": str(ctx.run.id),
                    "task_key": "a-task",
                    "state": ctx.validated_state.model_dump(mode="json"),
                    "retry": False,
                },
                message_id=str(ctx.validated_state.id),
            )
        ]
        json.dumps(ctx.outbox[0].body)

    async def test_awaiting_retry_is_flagged_as_a_retry(self, store: AdminStore) -> None:
        """A deferred "AwaitingRetry" state is enqueued with retry set."""
        ctx = await self._schedule(store, deferred=True, name="AwaitingRetry")

        assert [message.body["retry"] for message in ctx.outbox] == [True]

    async def test_non_deferred_scheduled_state_is_not_enqueued(self, store: AdminStore) -> None:
        """An ordinary SCHEDULED state is left to its executor."""
        ctx = await self._schedule(store, deferred=False)

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.outbox == []

    async def test_nothing_is_enqueued_when_the_state_is_not_written(
        self, store: AdminStore
    ) -> None:
        """An aborted deferred SCHEDULED proposal enqueues nothing."""
        ctx = await self._schedule(store, deferred=True, extra_rules=[AbortingRule])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.outbox == []
