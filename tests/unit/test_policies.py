"""Policy compilation: priority order is kept and only matching rules are returned.

A port of Prefect's ``tests/server/orchestration/test_policies.py`` (reference §5.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, BaseOrchestrationRule
from arbiter.rules.context import OrchestrationContext
from arbiter.rules.policy import BaseOrchestrationPolicy, RuleClass
from arbiter.schemas.states import StateType

AnyContext: TypeAlias = OrchestrationContext[Any]


class FirstRuleOfFightClub(BaseOrchestrationRule[AnyContext]):
    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES


class SecondRuleOfFightClub(BaseOrchestrationRule[AnyContext]):
    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES


class ThirdRuleOfFightClub(BaseOrchestrationRule[AnyContext]):
    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES


class TestPoliciesRespectOrdering:
    def test_policies_return_rules_in_priority_order(self) -> None:
        """Compiled rules keep priority order, so reordering a policy reorders its rules."""

        class Policy(BaseOrchestrationPolicy):
            @staticmethod
            def priority() -> Sequence[RuleClass]:
                return [FirstRuleOfFightClub, SecondRuleOfFightClub, ThirdRuleOfFightClub]

        class SamePolicy(BaseOrchestrationPolicy):
            @staticmethod
            def priority() -> Sequence[RuleClass]:
                return [FirstRuleOfFightClub, SecondRuleOfFightClub, ThirdRuleOfFightClub]

        class ReorderedPolicy(BaseOrchestrationPolicy):
            @staticmethod
            def priority() -> Sequence[RuleClass]:
                return [ThirdRuleOfFightClub, FirstRuleOfFightClub, SecondRuleOfFightClub]

        transition = (StateType.RUNNING, StateType.COMPLETED)
        compiled = Policy.compile_transition_rules(*transition)

        assert compiled == [FirstRuleOfFightClub, SecondRuleOfFightClub, ThirdRuleOfFightClub]
        assert SamePolicy.compile_transition_rules(*transition) == compiled
        assert ReorderedPolicy.compile_transition_rules(*transition) == [
            ThirdRuleOfFightClub,
            FirstRuleOfFightClub,
            SecondRuleOfFightClub,
        ]

    def test_policies_only_return_relevant_rules(self) -> None:
        """Rules whose FROM or TO states miss the transition are left out of the compiled list."""

        class UnscopedRule(BaseOrchestrationRule[AnyContext]):
            """FROM_STATES and TO_STATES default to empty: the rule applies to nothing."""

        class NoFromStatesRule(BaseOrchestrationRule[AnyContext]):
            TO_STATES = ALL_ORCHESTRATION_STATES

        class NoToStatesRule(BaseOrchestrationRule[AnyContext]):
            FROM_STATES = ALL_ORCHESTRATION_STATES

        class ElsewhereRule(BaseOrchestrationRule[AnyContext]):
            FROM_STATES = frozenset({StateType.RUNNING})
            TO_STATES = frozenset({StateType.COMPLETED})

        class Policy(BaseOrchestrationPolicy):
            @staticmethod
            def priority() -> Sequence[RuleClass]:
                return [
                    UnscopedRule,
                    NoFromStatesRule,
                    FirstRuleOfFightClub,
                    NoToStatesRule,
                    ElsewhereRule,
                ]

        compiled = Policy.compile_transition_rules(StateType.PENDING, StateType.RUNNING)

        assert compiled == [FirstRuleOfFightClub]
