"""Policies: ordered lists of rules. Order is priority (outermost first)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from arbiter.rules.base import BaseOrchestrationRule, BaseUniversalTransform, StateTypeOrNone

RuleClass: TypeAlias = type[BaseOrchestrationRule] | type[BaseUniversalTransform]  # type: ignore[type-arg]


class BaseOrchestrationPolicy:
    """A policy is its ``priority()``; compilation keeps the rules that apply."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return ()

    @classmethod
    def compile_transition_rules(
        cls, from_state: StateTypeOrNone = None, to_state: StateTypeOrNone = None
    ) -> list[RuleClass]:
        """The rules whose FROM/TO sets contain this transition, in priority order."""
        return [
            rule
            for rule in cls.priority()
            if from_state in rule.FROM_STATES and to_state in rule.TO_STATES
        ]
