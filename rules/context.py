"""The orchestration context: one transition, threaded through every rule.

Rules receive *safe copies* (``entry_context``/``exit_context``): assigning a
state's top-level fields on a copy does not touch the real context, while the
nested ``state_details`` object and the run are shared on purpose, exactly as
in Prefect, because several rules rely on writing through them.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, Self, TypeVar

from arbiter.rules.errors import StoreError
from arbiter.rules.results import (
    OrchestrationResult,
    SetStateStatus,
    StateAbortDetails,
    StateAcceptDetails,
    StateRejectDetails,
    StateWaitDetails,
)
from arbiter.rules.store import Store
from arbiter.schemas.messages import RuleEffect, RuleTraceEntry
from arbiter.schemas.runs import FlowRun, FlowRunPolicy, RunKind, TaskRun, TaskRunPolicy
from arbiter.schemas.states import State, StateType, utcnow

if TYPE_CHECKING:
    from arbiter.rules.engine import Orchestrator

Clock = Callable[[], dt.datetime]
ResponseDetails = StateAcceptDetails | StateRejectDetails | StateAbortDetails | StateWaitDetails
ParameterValue = object
RunT = TypeVar("RunT", FlowRun, TaskRun)


@dataclass(frozen=True)
class RuleSettings:
    """Server settings that rules consult (Prefect's defaults)."""

    max_cache_key_length: int = 2000
    tag_concurrency_slot_wait_s: int = 10
    # How long a global-limit slot is leased: renewed by the holder's accepted transitions,
    # reclaimed once expired (rules.core.global_limits).
    slot_lease_ttl_s: float = 3600.0
    # Prefect's server.deployments.concurrency_slot_wait_seconds: an ENQUEUEd run's wait.
    deployment_concurrency_slot_wait_s: int = 30
    # Prefect's server.concurrency.initial_deployment_lease_duration: a deployment slot's
    # lease when the deployment sets no grace period.
    deployment_lease_duration_s: float = 300.0


@dataclass(frozen=True)
class OutboxMessage:
    """A message a rule wants published once the transaction has committed.

    ``channel`` is ``"event"`` (state-change events) or ``"task_run"``
    (deferred task runs to enqueue); the worker maps each to an exchange.
    ``message_id`` is stable (the written state's id), so a consumer can drop
    the copies a replay publishes again.
    """

    channel: Literal["event", "task_run"]
    routing_key: str
    body: dict[str, object]
    message_id: str


@dataclass
class OrchestrationContext(Generic[RunT]):
    """A state transition governed by rules (Prefect's OrchestrationContext)."""

    store: Store
    run: RunT
    initial_state: State | None
    proposed_state: State | None
    validated_state: State | None = None
    rule_signature: list[str] = field(default_factory=list)
    finalization_signature: list[str] = field(default_factory=list)
    response_status: SetStateStatus = SetStateStatus.ACCEPT
    response_details: ResponseDetails = field(default_factory=StateAcceptDetails)
    orchestration_error: Exception | None = None
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    clock: Clock = utcnow
    settings: RuleSettings = field(default_factory=RuleSettings)
    client_version: str | None = None
    rule_trace: list[RuleTraceEntry] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    # The engine that built this context, for rules that orchestrate another run
    # in the same transaction (a subflow's parent task).
    orchestrator: Orchestrator | None = None

    run_kind: RunKind = "flow_run"

    @property
    def initial_state_type(self) -> StateType | None:
        return self.initial_state.type if self.initial_state else None

    @property
    def proposed_state_type(self) -> StateType | None:
        return self.proposed_state.type if self.proposed_state else None

    @property
    def validated_state_type(self) -> StateType | None:
        return self.validated_state.type if self.validated_state else None

    def now(self) -> dt.datetime:
        return self.clock()

    def safe_copy(self) -> Self:
        """A shallow copy whose states are shallow copies: rules can't reassign the real ones."""
        clone = copy.copy(self)
        clone.initial_state = self.initial_state.model_copy() if self.initial_state else None
        clone.proposed_state = self.proposed_state.model_copy() if self.proposed_state else None
        clone.validated_state = self.validated_state.model_copy() if self.validated_state else None
        clone.parameters = dict(self.parameters)
        return clone

    def entry_context(self) -> tuple[State | None, State | None, Self]:
        """The arguments of ``before_transition``: (initial, proposed, context) copies."""
        safe = self.safe_copy()
        return safe.initial_state, safe.proposed_state, safe

    def exit_context(self) -> tuple[State | None, State | None, Self]:
        """The arguments of ``after_transition``/``cleanup``: (initial, validated, context)."""
        safe = self.safe_copy()
        return safe.initial_state, safe.validated_state, safe

    def trace(self, rule: str, effect: RuleEffect, reason: str | None = None) -> None:
        self.rule_trace.append(RuleTraceEntry(rule=rule, effect=effect, reason=reason))

    async def validate_proposed_state(self) -> None:
        """Write the proposed state (or keep the current one) and set ``validated_state``.

        A store error marked retryable propagates so the whole transaction is retried;
        any other failure aborts the transition and lets the rules clean up.
        """
        if self.proposed_state is None:
            self.validated_state = self.run.state
            return
        try:
            await self.store.insert_state(self.run_kind, self.run, self.proposed_state)
        except StoreError as exc:
            self.proposed_state = None
            if exc.retryable:
                raise
            self._abort_on_validation_error(exc)
            return
        except Exception as exc:
            self.proposed_state = None
            self._abort_on_validation_error(exc)
            return
        self.run.state = self.proposed_state
        self.validated_state = self.proposed_state

    def _abort_on_validation_error(self, exc: BaseException) -> None:
        self.response_status = SetStateStatus.ABORT
        self.response_details = StateAbortDetails(reason=f"Error validating state: {exc!r}")
        self.validated_state = self.run.state

    def result(self) -> OrchestrationResult:
        return OrchestrationResult(
            state=self.validated_state, status=self.response_status, details=self.response_details
        )


@dataclass
class FlowOrchestrationContext(OrchestrationContext[FlowRun]):
    """A flow run's transition."""

    run_kind: RunKind = "flow_run"

    @property
    def run_settings(self) -> FlowRunPolicy:
        return self.run.empirical_policy

    async def flow_run(self) -> FlowRun | None:
        return self.run

    async def task_run(self) -> TaskRun | None:
        return None


@dataclass
class TaskOrchestrationContext(OrchestrationContext[TaskRun]):
    """A task run's transition."""

    run_kind: RunKind = "task_run"
    # Flow runs read during this transition, shared by the context's safe copies: several
    # rules ask for the enclosing flow run, and nothing in a task transition changes it.
    read_flow_runs: dict[uuid.UUID, FlowRun | None] = field(default_factory=dict)

    @property
    def run_settings(self) -> TaskRunPolicy:
        return self.run.empirical_policy

    async def flow_run(self) -> FlowRun | None:
        """The enclosing flow run, read without a lock (once per transition; each caller gets
        its own copy); None for autonomous tasks."""
        flow_run_id = self.run.flow_run_id
        if flow_run_id is None:
            return None
        if flow_run_id not in self.read_flow_runs:
            self.read_flow_runs[flow_run_id] = await self.store.read_flow_run(flow_run_id)
        flow_run = self.read_flow_runs[flow_run_id]
        return flow_run.model_copy(deep=True) if flow_run is not None else None

    async def task_run(self) -> TaskRun | None:
        return self.run
