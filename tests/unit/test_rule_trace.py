"""The rule trace: which rules changed a transition, and how.

Every rule that rejects, delays, aborts, renames or otherwise alters the proposed
state leaves one entry on ``context.rule_trace`` (published with the outcome); a rule
that fizzles and cleans up leaves one more. Universal transforms are bookkeeping and
leave none.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, TypeAlias

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    BaseOrchestrationRule,
    BaseUniversalTransform,
)
from arbiter.rules.context import OrchestrationContext
from arbiter.rules.engine import Orchestrator
from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.messages import RuleEffect, RuleTraceEntry
from arbiter.schemas.states import State, StateType
from tests.factories import create_flow_run, initialize_orchestration, make_state

AnyContext: TypeAlias = OrchestrationContext[Any]
TRANSITION = (StateType.PENDING, StateType.RUNNING)


class AnyTransitionRule(BaseOrchestrationRule[AnyContext]):
    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES


class RejectingRule(AnyTransitionRule):
    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.reject_transition(make_state(StateType.SCHEDULED), reason="not yet")


class WaitingRule(AnyTransitionRule):
    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.delay_transition(7, reason="slot busy")


class AbortingRule(AnyTransitionRule):
    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.abort_transition(reason="go away")


class RenamingRule(AnyTransitionRule):
    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.rename_state("Rerunning")


class DetailsMutatingRule(AnyTransitionRule):
    """Writes through the shared ``state_details`` of its proposed-state copy."""

    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        assert proposed_state is not None
        proposed_state.state_details.scheduled_time = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class CopyMutatingRule(AnyTransitionRule):
    """Reassigns a top-level field of its proposed-state copy, which never reaches the context."""

    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        assert proposed_state is not None
        proposed_state.name = "Sneaky"


class CleaningRule(AnyTransitionRule):
    """Does nothing on entry but knows how to undo its (imaginary) side effects."""

    async def cleanup(
        self, initial_state: State | None, validated_state: State | None, context: AnyContext
    ) -> None:
        pass


class RaisingRule(AnyTransitionRule):
    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        raise RuntimeError("boom")


class MeddlingTransform(BaseUniversalTransform[AnyContext]):
    """Renames the proposed state and rewrites its details, as bookkeeping may."""

    async def before_transition(self, context: AnyContext) -> None:
        assert context.proposed_state is not None
        context.proposed_state.name = "Bookkept"
        context.proposed_state.state_details.scheduled_time = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


async def orchestrate_by_hand(
    ctx: AnyContext, *rules: type[AnyTransitionRule] | type[MeddlingTransform]
) -> None:
    """Enter ``rules`` outermost first on the context's transition, then validate."""
    async with contextlib.AsyncExitStack() as stack:
        for rule in rules:
            await stack.enter_async_context(rule(ctx, *TRANSITION))
        await ctx.validate_proposed_state()


class TestRuleTrace:
    async def test_a_reject_adds_one_entry(self, store: InMemoryStore) -> None:
        """A rejecting rule is traced once, by class name, with its reason."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, RejectingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="RejectingRule", effect=RuleEffect.REJECT, reason="not yet")
        ]

    async def test_a_wait_adds_one_entry(self, store: InMemoryStore) -> None:
        """A delaying rule is traced once, by class name, with its reason."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, WaitingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="WaitingRule", effect=RuleEffect.WAIT, reason="slot busy")
        ]

    async def test_an_abort_adds_one_entry(self, store: InMemoryStore) -> None:
        """An aborting rule is traced once, by class name, with its reason."""
        ctx = await initialize_orchestration(store, "flow", *TRANSITION)

        await orchestrate_by_hand(ctx, AbortingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="AbortingRule", effect=RuleEffect.ABORT, reason="go away")
        ]

    async def test_a_rename_adds_one_entry_with_the_new_name(self, store: InMemoryStore) -> None:
        """A renaming rule is traced once, with the new name as its reason."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, RenamingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="RenamingRule", effect=RuleEffect.RENAME, reason="Rerunning")
        ]

    async def test_mutating_the_proposed_details_records_mutate(self, store: InMemoryStore) -> None:
        """A before-hook that alters the proposed state's details is traced as a mutation."""
        ctx = await initialize_orchestration(store, "flow", *TRANSITION)

        await orchestrate_by_hand(ctx, DetailsMutatingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="DetailsMutatingRule", effect=RuleEffect.MUTATE, reason=None)
        ]

    async def test_mutating_only_a_copy_records_nothing(self, store: InMemoryStore) -> None:
        """Reassigning a field of the hook's own copy changes nothing, so nothing is traced."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, CopyMutatingRule)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Running"
        assert ctx.rule_trace == []

    async def test_a_fizzled_rule_with_cleanup_records_cleanup(self, store: InMemoryStore) -> None:
        """A rule that fizzles and overrides cleanup is traced after the rule that fizzled it."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, CleaningRule, RejectingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="RejectingRule", effect=RuleEffect.REJECT, reason="not yet"),
            RuleTraceEntry(rule="CleaningRule", effect=RuleEffect.CLEANUP, reason=None),
        ]

    async def test_a_fizzled_rule_that_changed_something_records_fizzle(
        self, store: InMemoryStore
    ) -> None:
        """A rule whose change was overridden, and that has no cleanup, is traced as fizzled."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, RenamingRule, RejectingRule)

        assert ctx.rule_trace == [
            RuleTraceEntry(rule="RenamingRule", effect=RuleEffect.RENAME, reason="Rerunning"),
            RuleTraceEntry(rule="RejectingRule", effect=RuleEffect.REJECT, reason="not yet"),
            RuleTraceEntry(rule="RenamingRule", effect=RuleEffect.FIZZLE, reason=None),
        ]

    async def test_a_fizzled_rule_without_changes_or_cleanup_records_nothing(
        self, store: InMemoryStore
    ) -> None:
        """A bystander that fizzles with nothing to undo is not traced."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, AnyTransitionRule, RejectingRule)

        assert [entry.rule for entry in ctx.rule_trace] == ["RejectingRule"]

    async def test_a_before_hook_error_records_the_abort(self, store: InMemoryStore) -> None:
        """A rule whose before-hook raises is traced as the abort it causes."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, RaisingRule)

        assert len(ctx.rule_trace) == 1
        entry = ctx.rule_trace[0]
        assert (entry.rule, entry.effect) == ("RaisingRule", RuleEffect.ABORT)
        assert entry.reason is not None
        assert entry.reason.startswith("Aborting orchestration due to error in ")
        assert entry.reason.endswith("!RuntimeError('boom')")

    async def test_universal_transforms_record_nothing(self, store: InMemoryStore) -> None:
        """A transform that renames the proposed state and rewrites its details is not traced."""
        ctx = await initialize_orchestration(store, "task", *TRANSITION)

        await orchestrate_by_hand(ctx, AnyTransitionRule, MeddlingTransform)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Bookkept"
        assert ctx.rule_trace == []

    async def test_the_global_bookkeeping_records_nothing(self, store: InMemoryStore) -> None:
        """A forced transition through the global transforms leaves an empty trace."""
        run = await create_flow_run(store)

        ctx = await Orchestrator().set_flow_run_state(
            store, run, make_state(StateType.RUNNING), force=True
        )

        assert ctx.validated_state_type is StateType.RUNNING
        assert run.run_count == 1
        assert ctx.rule_trace == []
