"""Helpers shared by the rule-framework tests: readable transition ids, every transition of
two lists of state types, a deterministic "other" state type, and ``SpyRule``, a rule valid
for every transition that counts its hooks."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import Any, TypeAlias

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, BaseOrchestrationRule, StateTypeOrNone
from arbiter.rules.context import OrchestrationContext
from arbiter.schemas.states import State, StateType
from tests.factories import RunType

AnyContext: TypeAlias = OrchestrationContext[Any]
Transition: TypeAlias = tuple[StateTypeOrNone, StateTypeOrNone]

# Sorted so the parametrized ids come out in a stable order.
ALL_STATES: list[StateTypeOrNone] = sorted(ALL_ORCHESTRATION_STATES, key=str)
TYPES: list[StateType] = list(StateType)
RUN_TYPES: list[RunType] = ["task", "flow"]


def transition_id(transition: Transition) -> str:
    """``RUNNING->COMPLETED``, ``None->PENDING``: readable parametrize ids."""
    initial, proposed = transition
    return f"{initial.name if initial else None}->{proposed.name if proposed else None}"


def transitions(
    initials: Sequence[StateTypeOrNone], proposeds: Sequence[StateTypeOrNone]
) -> list[Transition]:
    return list(product(initials, proposeds))


def other_type(*excluded: StateTypeOrNone) -> StateType:
    """The first state type that is none of ``excluded``: a deterministic 'something else'."""
    return next(t for t in StateType if t not in excluded)


class SpyRule(BaseOrchestrationRule[AnyContext]):
    """A rule valid for every transition that counts its hooks; subclasses add ``act``.

    Each before or after hook leaves one side effect and each cleanup undoes one,
    so ``side_effects`` is 0 exactly when the rule cleaned up everything it did.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES

    def __init__(
        self,
        context: AnyContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self.before = 0
        self.after = 0
        self.cleaned = 0

    @property
    def side_effects(self) -> int:
        return self.before + self.after - self.cleaned

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        """What the rule does on entry besides counting; nothing by default."""

    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        self.before += 1
        await self.act(initial_state, proposed_state, context)

    async def after_transition(
        self, initial_state: State | None, validated_state: State | None, context: AnyContext
    ) -> None:
        self.after += 1

    async def cleanup(
        self, initial_state: State | None, validated_state: State | None, context: AnyContext
    ) -> None:
        self.cleaned += 1
