"""Rules and universal transforms: the units that govern a transition.

A rule is an async context manager entered with the *intended* transition
(initial type, proposed type as submitted). Its hooks fire only while the
transition is still the one it was built for; if a later rule changes the
transition, the rule *fizzles* and its ``cleanup`` undoes its side effects.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import ClassVar, Generic, TypeVar

from arbiter.rules.context import (
    FlowOrchestrationContext,
    OrchestrationContext,
    TaskOrchestrationContext,
)
from arbiter.rules.errors import OrchestrationError
from arbiter.rules.results import (
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
    StateWaitDetails,
)
from arbiter.schemas.messages import RuleEffect
from arbiter.schemas.states import State, StateType

StateTypeOrNone = StateType | None
ALL_ORCHESTRATION_STATES: frozenset[StateTypeOrNone] = frozenset([*StateType, None])
TERMINAL_TYPES: frozenset[StateTypeOrNone] = frozenset(
    {StateType.COMPLETED, StateType.CANCELLED, StateType.FAILED, StateType.CRASHED}
)

ContextT = TypeVar("ContextT", bound=OrchestrationContext)  # type: ignore[type-arg]


_SIGNATURES: dict[type, str] = {}


def _signature(rule_class: type) -> str:
    """How a rule is named in a context's signatures (``str`` of its class), said once."""
    name = _SIGNATURES.get(rule_class)
    if name is None:
        name = _SIGNATURES[rule_class] = str(rule_class)
    return name


def states(*types: StateTypeOrNone) -> frozenset[StateTypeOrNone]:
    return frozenset(types)


def all_states_except(*types: StateTypeOrNone) -> frozenset[StateTypeOrNone]:
    return ALL_ORCHESTRATION_STATES - frozenset(types)


class BaseOrchestrationRule(Generic[ContextT]):
    """A discrete piece of orchestration logic applying to FROM_STATES → TO_STATES."""

    FROM_STATES: ClassVar[Iterable[StateTypeOrNone]] = frozenset()
    TO_STATES: ClassVar[Iterable[StateTypeOrNone]] = frozenset()

    def __init__(
        self,
        context: ContextT,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        self.context = context
        self.from_state_type = from_state_type
        self.to_state_type = to_state_type
        self._invalid_on_entry: bool | None = None
        self._changed = False

    @classmethod
    def name(cls) -> str:
        return cls.__name__

    async def __aenter__(self) -> ContextT:
        if await self.invalid():
            return self.context
        if type(self).before_transition is BaseOrchestrationRule.before_transition:
            # No before-hook: nothing can mutate the proposal, and no copies are needed.
            self.context.rule_signature.append(_signature(type(self)))
            return self.context
        entry = self.context.entry_context()
        before = self._proposed_fingerprint()
        try:
            await self.before_transition(*entry)
            self.context.rule_signature.append(_signature(type(self)))
        except Exception as exc:
            self.context.proposed_state = None
            self.context.response_status = SetStateStatus.ABORT
            reason = f"Aborting orchestration due to error in {type(self)!r}: !{exc!r}"
            self.context.response_details = StateAbortDetails(reason=reason)
            self.context.orchestration_error = exc
            self.context.trace(self.name(), RuleEffect.ABORT, reason)
            return self.context
        if not self._changed and self._proposed_fingerprint() != before:
            self._changed = True
            self.context.trace(self.name(), RuleEffect.MUTATE)
        return self.context

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The copies are taken before anything below can change the context, and only for
        # a hook the rule overrides: for the base class's no-op they cost more than it.
        cleans = self._overrides_cleanup()
        finishes = type(self).after_transition is not BaseOrchestrationRule.after_transition
        exit_args = self.context.exit_context() if cleans or finishes else None
        if await self.invalid():
            return
        if await self.fizzled():
            if self._changed or cleans:
                effect = RuleEffect.CLEANUP if cleans else RuleEffect.FIZZLE
                self.context.trace(self.name(), effect)
            if exit_args is not None and cleans:
                await self.cleanup(*exit_args)
        else:
            if exit_args is not None and finishes:
                await self.after_transition(*exit_args)
            self.context.finalization_signature.append(_signature(type(self)))

    def _overrides_cleanup(self) -> bool:
        return type(self).cleanup is not BaseOrchestrationRule.cleanup

    def _proposed_fingerprint(self) -> object:
        proposed = self.context.proposed_state
        return None if proposed is None else proposed.model_dump()

    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: ContextT
    ) -> None:
        """Runs before validation; may mutate or replace the proposed state."""

    async def after_transition(
        self, initial_state: State | None, validated_state: State | None, context: ContextT
    ) -> None:
        """Runs after validation when the transition is still the one the rule saw."""

    async def cleanup(
        self, initial_state: State | None, validated_state: State | None, context: ContextT
    ) -> None:
        """Runs instead of ``after_transition`` when a later rule changed the transition."""

    async def invalid(self) -> bool:
        """Whether the rule does not apply; FROM/TO membership is sticky once false."""
        if self.from_state_type not in self.FROM_STATES:
            self._invalid_on_entry = True
        if self.to_state_type not in self.TO_STATES:
            self._invalid_on_entry = True
        if self._invalid_on_entry is None:
            self._invalid_on_entry = await self.invalid_transition()
        return self._invalid_on_entry

    async def fizzled(self) -> bool:
        """Whether the transition changed under a rule that was valid on entry."""
        if self._invalid_on_entry:
            return False
        return await self.invalid_transition()

    async def invalid_transition(self) -> bool:
        return (
            self.from_state_type != self.context.initial_state_type
            or self.to_state_type != self.context.proposed_state_type
        )

    def _guard_not_validated(self) -> None:
        if self.context.validated_state is not None:
            raise RuntimeError("The transition is already validated")

    async def reject_transition(self, state: State | None, reason: str) -> None:
        """Write ``state`` instead of the proposed one (None: write nothing)."""
        self._guard_not_validated()
        if state is None:
            if self.from_state_type is None:
                raise OrchestrationError(
                    "The current run has no state; this transition cannot be rejected "
                    "without providing a new state."
                )
            self.to_state_type = None
        else:
            self.to_state_type = state.type
        self.context.proposed_state = state
        self.context.response_status = SetStateStatus.REJECT
        self.context.response_details = StateRejectDetails(reason=reason)
        self._record(RuleEffect.REJECT, reason)

    async def delay_transition(self, delay_seconds: int, reason: str) -> None:
        """Write nothing; the executor should propose again after ``delay_seconds``."""
        self._guard_not_validated()
        self.to_state_type = None
        self.context.proposed_state = None
        self.context.response_status = SetStateStatus.WAIT
        self.context.response_details = StateWaitDetails(delay_seconds=delay_seconds, reason=reason)
        self._record(RuleEffect.WAIT, reason)

    async def abort_transition(self, reason: str) -> None:
        """Write nothing; the executor should stop working on this run."""
        self._guard_not_validated()
        self.to_state_type = None
        self.context.proposed_state = None
        self.context.response_status = SetStateStatus.ABORT
        self.context.response_details = StateAbortDetails(reason=reason)
        self._record(RuleEffect.ABORT, reason)

    async def rename_state(self, state_name: str) -> None:
        """Keep the proposed type but write it under another name."""
        if self.context.proposed_state is not None:
            self.context.proposed_state.name = state_name
            self._record(RuleEffect.RENAME, state_name)

    async def update_context_parameters(self, key: str, value: object) -> None:
        """Pass a value to later rules (writes to a copy's ``parameters`` are lost)."""
        self.context.parameters[key] = value

    def _record(self, effect: RuleEffect, reason: str | None) -> None:
        self._changed = True
        self.context.trace(self.name(), effect, reason)


class FlowRunOrchestrationRule(BaseOrchestrationRule[FlowOrchestrationContext]):
    """A rule that only governs flow runs."""


class TaskRunOrchestrationRule(BaseOrchestrationRule[TaskOrchestrationContext]):
    """A rule that only governs task runs."""


class GenericOrchestrationRule(BaseOrchestrationRule[OrchestrationContext]):  # type: ignore[type-arg]
    """A rule that governs flow and task runs alike."""


class BaseUniversalTransform(Generic[ContextT]):
    """Privileged bookkeeping that runs on every transition and gets the real context."""

    FROM_STATES: ClassVar[Iterable[StateTypeOrNone]] = ALL_ORCHESTRATION_STATES
    TO_STATES: ClassVar[Iterable[StateTypeOrNone]] = ALL_ORCHESTRATION_STATES

    def __init__(
        self,
        context: ContextT,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        self.context = context
        self.from_state_type = from_state_type
        self.to_state_type = to_state_type

    @classmethod
    def name(cls) -> str:
        return cls.__name__

    async def __aenter__(self) -> ContextT:
        await self.before_transition(self.context)
        self.context.rule_signature.append(_signature(type(self)))
        return self.context

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not await self.exception_in_transition():
            await self.after_transition(self.context)
            self.context.finalization_signature.append(_signature(type(self)))

    async def before_transition(self, context: ContextT) -> None:
        """Runs on entry, for every transition."""

    async def after_transition(self, context: ContextT) -> None:
        """Runs on exit unless a rule raised."""

    async def nullified_transition(self) -> bool:
        """Whether nothing will be written (the proposed state is None)."""
        return self.context.proposed_state is None

    async def exception_in_transition(self) -> bool:
        """Whether a rule's before-hook raised during this transition."""
        return self.context.orchestration_error is not None


class FlowRunUniversalTransform(BaseUniversalTransform[FlowOrchestrationContext]):
    """Bookkeeping for flow runs only."""


class TaskRunUniversalTransform(BaseUniversalTransform[TaskOrchestrationContext]):
    """Bookkeeping for task runs only."""


class GenericUniversalTransform(BaseUniversalTransform[OrchestrationContext]):  # type: ignore[type-arg]
    """Bookkeeping for flow and task runs alike."""
