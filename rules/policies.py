"""Every policy, as an ordered list of rules: the one place where order lives."""

from __future__ import annotations

from collections.abc import Sequence

from rules import bookkeeping as bk
from rules.core.pending import PreventPendingTransitions
from rules.policy import BaseOrchestrationPolicy, RuleClass


class CoreFlowPolicy(BaseOrchestrationPolicy):
    """The rules a flow run's transition goes through unless forced."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (PreventPendingTransitions,)


class CoreTaskPolicy(BaseOrchestrationPolicy):
    """The rules a task run's transition goes through unless forced or deferred."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return ()


class BackgroundTaskPolicy(BaseOrchestrationPolicy):
    """Deferred (background) task runs: no parent flow and no tag limits."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (PreventPendingTransitions,)


class MinimalFlowPolicy(BaseOrchestrationPolicy):
    """Forced flow transitions: bookkeeping and data-loss protection only."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return ()


class MinimalTaskPolicy(BaseOrchestrationPolicy):
    """Forced task transitions: bookkeeping only."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return ()


class GlobalFlowPolicy(BaseOrchestrationPolicy):
    """Bookkeeping every flow transition gets, innermost."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            bk.EnsureFlowRunStateTimestampIsUnique,
            bk.SetRunStateType,
            bk.SetRunStateName,
            bk.SetRunStateTimestamp,
            bk.SetStartTime,
            bk.SetEndTime,
            bk.IncrementRunTime,
            bk.SetExpectedStartTime,
            bk.SetNextScheduledStartTime,
            bk.UpdateStateDetails,
            bk.UpdateSubflowParentTask,
            bk.UpdateSubflowStateDetails,
            bk.IncrementFlowRunCount,
            bk.RemoveResumingIndicator,
        )


class GlobalTaskPolicy(BaseOrchestrationPolicy):
    """Bookkeeping every task transition gets, innermost."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            bk.SetRunStateType,
            bk.SetRunStateName,
            bk.SetRunStateTimestamp,
            bk.SetStartTime,
            bk.SetEndTime,
            bk.IncrementRunTime,
            bk.SetExpectedStartTime,
            bk.SetNextScheduledStartTime,
            bk.UpdateStateDetails,
            bk.IncrementTaskRunCount,
        )
