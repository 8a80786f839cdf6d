"""Every policy, as an ordered list of rules: the one place where order lives.

Outermost first, in Prefect's order.
"""

from __future__ import annotations

from collections.abc import Sequence

from arbiter.rules import bookkeeping as bk
from arbiter.rules.core.background import CopyTaskParametersID, EnqueueScheduledTasks
from arbiter.rules.core.caching import CacheInsertion, CacheRetrieval
from arbiter.rules.core.cancelling import (
    BypassCancellingFlowRunsWithNoInfra,
    EnforceCancellingToCancelledTransition,
)
from arbiter.rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from arbiter.rules.core.deployments import (
    EnforceDeploymentConcurrencyOnLate,
    PreserveDeploymentConcurrencyLeaseId,
    ReleaseFlowConcurrencySlots,
    RemoveDeploymentConcurrencyLeaseForOldClientVersions,
    SecureFlowConcurrencySlots,
    ValidateDeploymentConcurrencyAtRunning,
)
from arbiter.rules.core.duplicates import PreventDuplicateTransitions
from arbiter.rules.core.late import EnsureOnlyScheduledFlowsMarkedLate
from arbiter.rules.core.pausing import HandlePausingFlows, HandleResumingPausedFlows
from arbiter.rules.core.pending import PreventPendingTransitions
from arbiter.rules.core.retries import RetryFailedFlows
from arbiter.rules.core.scheduling import CopyScheduledTime, WaitForScheduledTime
from arbiter.rules.core.stopped_flows import PreventRunningTasksFromStoppedFlows
from arbiter.rules.core.task_retries import (
    RenameReruns,
    RetryFailedTasks,
    UpdateFlowRunTrackerOnTasks,
)
from arbiter.rules.core.task_terminal import HandleTaskTerminalStateTransitions
from arbiter.rules.core.terminal import HandleFlowTerminalStateTransitions, PreventResultDataLoss
from arbiter.rules.instrumentation import InstrumentFlowRunStateTransitions
from arbiter.rules.policy import BaseOrchestrationPolicy, RuleClass


class CoreFlowPolicy(BaseOrchestrationPolicy):
    """The rules a flow run's transition goes through unless forced."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            PreserveDeploymentConcurrencyLeaseId,
            PreventDuplicateTransitions,
            HandleFlowTerminalStateTransitions,
            EnforceCancellingToCancelledTransition,
            BypassCancellingFlowRunsWithNoInfra,
            PreventPendingTransitions,
            ValidateDeploymentConcurrencyAtRunning,
            SecureFlowConcurrencySlots,
            RemoveDeploymentConcurrencyLeaseForOldClientVersions,
            EnsureOnlyScheduledFlowsMarkedLate,
            HandlePausingFlows,
            HandleResumingPausedFlows,
            CopyScheduledTime,
            WaitForScheduledTime,
            RetryFailedFlows,
            InstrumentFlowRunStateTransitions,
            ReleaseFlowConcurrencySlots,
        )


class CoreTaskPolicy(BaseOrchestrationPolicy):
    """The rules a task run's transition goes through unless forced or deferred."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            CacheRetrieval,
            HandleTaskTerminalStateTransitions,
            PreventRunningTasksFromStoppedFlows,
            SecureTaskConcurrencySlots,
            CopyScheduledTime,
            WaitForScheduledTime,
            RetryFailedTasks,
            RenameReruns,
            UpdateFlowRunTrackerOnTasks,
            CacheInsertion,
            ReleaseTaskConcurrencySlots,
        )


class ClientSideTaskOrchestrationPolicy(BaseOrchestrationPolicy):
    """CoreTaskPolicy without tag concurrency, for clients that limit concurrency themselves."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return tuple(
            rule for rule in CoreTaskPolicy.priority() if rule is not SecureTaskConcurrencySlots
        )


class BackgroundTaskPolicy(BaseOrchestrationPolicy):
    """Deferred (background) task runs: no parent flow check and no tag limits."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            PreventPendingTransitions,
            CacheRetrieval,
            HandleTaskTerminalStateTransitions,
            CopyScheduledTime,
            CopyTaskParametersID,
            WaitForScheduledTime,
            RetryFailedTasks,
            RenameReruns,
            UpdateFlowRunTrackerOnTasks,
            CacheInsertion,
            ReleaseTaskConcurrencySlots,
            EnqueueScheduledTasks,
        )


class MinimalFlowPolicy(BaseOrchestrationPolicy):
    """Forced flow transitions: data-loss protection, cancelling without infra, events."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            PreventResultDataLoss,
            BypassCancellingFlowRunsWithNoInfra,
            InstrumentFlowRunStateTransitions,
            ReleaseFlowConcurrencySlots,
        )


class MinimalTaskPolicy(BaseOrchestrationPolicy):
    """Forced task transitions: only slot release (and the global bookkeeping)."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (ReleaseTaskConcurrencySlots,)


class MarkLateRunsPolicy(BaseOrchestrationPolicy):
    """What a late-runs service would use to mark overdue scheduled runs "Late"."""

    @staticmethod
    def priority() -> Sequence[RuleClass]:
        return (
            EnsureOnlyScheduledFlowsMarkedLate,
            EnforceDeploymentConcurrencyOnLate,
            InstrumentFlowRunStateTransitions,
        )


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
