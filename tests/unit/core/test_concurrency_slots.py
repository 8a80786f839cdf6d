"""Task tag concurrency slots (``rules/core/concurrency.py``) beyond Prefect's suite: what
``SecureTaskConcurrencySlots`` claims and keeps when a proposal is blocked on one of several
tags, its WAIT delay, and what ``ReleaseTaskConcurrencySlots`` gives back on a retry or an
aborted transition.

Classes named after a rule hold Arbiter's extra scenarios; Prefect's own scenarios are in
``test_concurrency_limits.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from arbiter.rules.context import RuleSettings, TaskOrchestrationContext
from arbiter.rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from arbiter.rules.core.task_retries import RetryFailedTasks
from arbiter.rules.engine import Orchestrator, default_policies
from arbiter.rules.policies import ClientSideTaskOrchestrationPolicy, CoreTaskPolicy
from arbiter.rules.policy import BaseOrchestrationPolicy
from arbiter.rules.results import SetStateStatus, StateWaitDetails
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import create_task_run, initialize_orchestration, make_state
from tests.unit.core.helpers import (
    AbortingRule,
    apply_rules,
    hold_slots,
    slots,
)


class TestSecureTaskConcurrencySlots:
    """Our deviation from Prefect (§6 note 8): a blocked proposal never holds a slot."""

    async def _propose_running(
        self,
        store: AdminStore,
        tags: list[str],
        transition: tuple[StateType, StateType] = (StateType.PENDING, StateType.RUNNING),
        **options: object,
    ) -> TaskOrchestrationContext:
        initial, proposed = transition
        ctx = await initialize_orchestration(
            store, "task", initial, proposed, run_tags=tags, **options
        )
        return await apply_rules(ctx, [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots])

    async def _fill(self, store: AdminStore, tag: str, limit: int) -> None:
        await store.upsert_tag_limit(tag, limit)
        await hold_slots(store, tag, [str(uuid.uuid4()) for _ in range(limit)])
        assert len(await slots(store, tag)) == limit

    async def test_wait_on_a_later_tag_frees_the_slot_claimed_on_an_earlier_tag(
        self, store: AdminStore
    ) -> None:
        """A WAIT on the second tag leaves the first tag's slot free."""
        await store.upsert_tag_limit("a", 5)
        await self._fill(store, "b", 1)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.WAIT
        assert await slots(store, "a") == []

    async def test_abort_on_a_later_tag_frees_the_slot_claimed_on_an_earlier_tag(
        self, store: AdminStore
    ) -> None:
        """An ABORT on the second tag leaves the first tag's slot free."""
        await store.upsert_tag_limit("a", 5)
        await store.upsert_tag_limit("b", 0)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.ABORT
        assert await slots(store, "a") == []

    @pytest.mark.parametrize("blocking_limit", [0, 1], ids=["abort", "wait"])
    async def test_blocked_proposal_does_not_claim_later_tags(
        self, store: AdminStore, blocking_limit: int
    ) -> None:
        """Tags after the blocking one are not processed, so their slots stay free."""
        await self._fill(store, "a", blocking_limit)
        await store.upsert_tag_limit("b", 5)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status in (SetStateStatus.ABORT, SetStateStatus.WAIT)
        assert await slots(store, "b") == []

    async def test_first_blocking_tag_decides_the_outcome(self, store: AdminStore) -> None:
        """A zero limit on the first tag ABORTs even though a later tag is full."""
        await store.upsert_tag_limit("a", 0)
        await self._fill(store, "b", 1)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.ABORT

    async def test_wait_uses_the_configured_delay_and_names_the_tag(
        self, store: AdminStore
    ) -> None:
        """A full tag WAITs settings.tag_concurrency_slot_wait_s seconds."""
        await self._fill(store, "busy", 1)
        orchestrator = Orchestrator(settings=RuleSettings(tag_concurrency_slot_wait_s=7))

        ctx = await self._propose_running(store, ["busy"], orchestrator=orchestrator)

        assert ctx.response_status == SetStateStatus.WAIT
        assert ctx.response_details == StateWaitDetails(
            delay_seconds=7, reason="Concurrency limit for the busy tag has been reached"
        )

    async def test_default_wait_is_ten_seconds(self, store: AdminStore) -> None:
        """Prefect's default tag wait is 10 s."""
        await self._fill(store, "busy", 1)

        ctx = await self._propose_running(store, ["busy"])

        assert isinstance(ctx.response_details, StateWaitDetails)
        assert ctx.response_details.delay_seconds == 10

    async def test_blocked_restart_keeps_the_slots_it_already_held(self, store: AdminStore) -> None:
        """A RUNNING → RUNNING restart that is blocked keeps slots held before this call."""
        await store.upsert_tag_limit("a", 5)
        await store.upsert_tag_limit("b", 1)
        task1 = await self._propose_running(store, ["a", "b"])
        assert task1.response_status == SetStateStatus.ACCEPT

        # As in Prefect, a full limit blocks even the run that holds its slot.
        restart = await self._propose_running(
            store,
            ["a", "b"],
            transition=(StateType.RUNNING, StateType.RUNNING),
            run_override=task1.run,
        )

        assert restart.response_status == SetStateStatus.WAIT
        assert await slots(store, "a") == [str(task1.run.id)]
        assert await slots(store, "b") == [str(task1.run.id)]

    async def test_untagged_runs_are_not_limited(self, store: AdminStore) -> None:
        """A run without tags enters RUNNING whatever limits exist."""
        await store.upsert_tag_limit("a", 0)

        ctx = await self._propose_running(store, [])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestReleaseTaskConcurrencySlots:
    async def test_retry_releases_the_slot(self, store: AdminStore) -> None:
        """A failure turned into AwaitingRetry releases the slot: the written state is SCHEDULED."""
        await store.upsert_tag_limit("small", 1)
        running = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, run_tags=["small"]
        )
        running = await apply_rules(
            running, [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots]
        )
        assert await slots(store, "small") == [str(running.run.id)]

        failing = await initialize_orchestration(
            store, "task", StateType.RUNNING, StateType.FAILED, run_override=running.run
        )
        failing.run_settings.retries = 1
        failing = await apply_rules(failing, [RetryFailedTasks, ReleaseTaskConcurrencySlots])

        assert failing.response_status == SetStateStatus.REJECT
        assert failing.validated_state is not None
        assert failing.validated_state.name == "AwaitingRetry"
        assert await slots(store, "small") == []

    async def test_nullified_transitions_release_nothing(self, store: AdminStore) -> None:
        """An aborted transition releases nothing even when the current state is not RUNNING."""
        await store.upsert_tag_limit("small", 1)
        ctx = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, run_tags=["small"]
        )
        await hold_slots(store, "small", [str(ctx.run.id)])

        ctx = await apply_rules(ctx, [AbortingRule, ReleaseTaskConcurrencySlots])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.validated_state_type == StateType.PENDING
        assert await slots(store, "small") == [str(ctx.run.id)]


class TestClientSideTaskOrchestrationPolicy:
    """The core task policy for clients that enforce tag limits themselves."""

    @pytest.mark.parametrize(
        ("policy", "expected"),
        [
            (CoreTaskPolicy, SetStateStatus.WAIT),
            (ClientSideTaskOrchestrationPolicy, SetStateStatus.ACCEPT),
        ],
        ids=["core", "client-side"],
    )
    async def test_only_the_core_policy_holds_a_task_back_at_a_full_tag_limit(
        self, store: AdminStore, policy: type[BaseOrchestrationPolicy], expected: SetStateStatus
    ) -> None:
        """With the tag's only slot taken, RUNNING waits under the core task policy and is
        accepted under the client-side one, which takes no slot."""
        await store.upsert_tag_limit("gpu", 1)
        await hold_slots(store, "gpu", [str(uuid.uuid4())])
        run = await create_task_run(store, flow_run_id=None, tags=["gpu"])
        orchestrator = Orchestrator(policies=replace(default_policies(), task=policy))
        pending = await orchestrator.set_task_run_state(store, run, make_state(StateType.PENDING))
        assert pending.response_status is SetStateStatus.ACCEPT

        ctx = await orchestrator.set_task_run_state(store, run, make_state(StateType.RUNNING))

        assert ctx.response_status is expected
        assert len(await slots(store, "gpu")) == 1
