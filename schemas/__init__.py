"""Wire and domain models shared by the rules, the worker and executors."""

from arbiter.schemas.messages import (
    SCHEMA_VERSION,
    ErrorCode,
    Outcome,
    OutcomeDetails,
    OutcomeError,
    OutcomeStatus,
    Proposal,
    ProposedState,
    RuleEffect,
    RuleTraceEntry,
)
from arbiter.schemas.runs import (
    FlowRun,
    FlowRunPolicy,
    FlowRunSpec,
    RunKind,
    RunSummary,
    TaskRun,
    TaskRunPolicy,
    TaskRunSpec,
)
from arbiter.schemas.states import TERMINAL_STATES, State, StateDetails, StateType, default_name

__all__ = [
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "ErrorCode",
    "FlowRun",
    "FlowRunPolicy",
    "FlowRunSpec",
    "Outcome",
    "OutcomeDetails",
    "OutcomeError",
    "OutcomeStatus",
    "Proposal",
    "ProposedState",
    "RuleEffect",
    "RuleTraceEntry",
    "RunKind",
    "RunSummary",
    "State",
    "StateDetails",
    "StateType",
    "TaskRun",
    "TaskRunPolicy",
    "TaskRunSpec",
    "default_name",
]
