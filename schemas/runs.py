"""Flow and task runs: their wire descriptions, their policies and their rows.

The *spec* models are what an executor sends the first time a run is seen; the
*run* models are what rules read and mutate during orchestration (the store
loads them, the worker writes them back in the same transaction).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from arbiter.schemas.copying import FastDeepCopy
from arbiter.schemas.states import State, StateType, UtcDatetime

RunKind = Literal["flow_run", "task_run"]


class FlowRunPolicy(FastDeepCopy):
    """Prefect's FlowRunPolicy: retry settings plus pause/resume bookkeeping."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retries: int | None = None
    retry_delay: int | None = None
    pause_keys: set[str] = Field(default_factory=set)
    resuming: bool = False
    retry_type: Literal["in_process", "reschedule"] | None = None


class TaskRunPolicy(FastDeepCopy):
    """Prefect's TaskRunPolicy: retries, per-attempt delays and jitter."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retries: int | None = None
    retry_delay: int | float | list[int] | list[float] | None = None
    retry_jitter_factor: float | None = Field(default=None, ge=0)

    @field_validator("retry_delay")
    @classmethod
    def _at_most_50_delays(
        cls, value: int | float | list[int] | list[float] | None
    ) -> int | float | list[int] | list[float] | None:
        if isinstance(value, list) and len(value) > 50:
            raise ValueError("retry_delay may list at most 50 delays")
        return value


class DeploymentSpec(FastDeepCopy):
    """A deployment as a flow run's description names it: the store creates or updates it
    (its concurrency settings included) with the run. Prefect's deployment concurrency:
    at most ``concurrency_limit`` of its runs between PENDING and the end of RUNNING;
    ``collision_strategy`` says what a run that finds the limit full gets (ENQUEUE: back
    to Scheduled "AwaitingConcurrencySlot"; CANCEL_NEW: Cancelled); a slot's lease lasts
    ``grace_period_seconds`` (else the workers' ``ARBITER_DEPLOYMENT_LEASE_DURATION_S``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: uuid.UUID
    name: str = ""
    concurrency_limit: int | None = Field(default=None, ge=0)
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"] = "ENQUEUE"
    grace_period_seconds: int | None = Field(default=None, ge=60, le=86400)


class FlowRunSpec(BaseModel):
    """How an executor describes a flow run it proposes a state for the first time."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = ""
    flow_name: str = ""
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    deployment_id: uuid.UUID | None = None
    parent_task_run_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    infrastructure_pid: str | None = None
    empirical_policy: FlowRunPolicy = Field(default_factory=FlowRunPolicy)
    deployment: DeploymentSpec | None = None

    @model_validator(mode="after")
    def _one_deployment(self) -> FlowRunSpec:
        if self.deployment is not None:
            if self.deployment_id is None:
                self.deployment_id = self.deployment.id
            elif self.deployment_id != self.deployment.id:
                raise ValueError("deployment_id and deployment.id name different deployments")
        return self


class TaskRunSpec(BaseModel):
    """How an executor describes a task run it proposes a state for the first time."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = ""
    flow_run_id: uuid.UUID | None = None
    task_key: str = ""
    dynamic_key: str = ""
    cache_key: str | None = None
    cache_expiration: UtcDatetime | None = None
    tags: list[str] = Field(default_factory=list)
    task_inputs: dict[str, JsonValue] = Field(default_factory=dict)
    empirical_policy: TaskRunPolicy = Field(default_factory=TaskRunPolicy)


class RunSummary(BaseModel):
    """The run's bookkeeping after a transition, as carried by every outcome."""

    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    total_run_time: float = 0.0
    expected_start_time: dt.datetime | None = None


class _RunBase(FastDeepCopy):
    """Columns common to flow and task runs (Prefect's ``Run``)."""

    model_config = ConfigDict(validate_assignment=False)

    id: uuid.UUID
    name: str = ""
    tags: list[str] = Field(default_factory=list)
    state: State | None = None
    state_type: StateType | None = None
    state_name: str | None = None
    state_timestamp: dt.datetime | None = None
    run_count: int = 0
    expected_start_time: dt.datetime | None = None
    next_scheduled_start_time: dt.datetime | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    total_run_time: dt.timedelta = dt.timedelta(0)

    @property
    def state_id(self) -> uuid.UUID | None:
        return self.state.id if self.state is not None else None

    def summary(self) -> RunSummary:
        return RunSummary(
            state_type=self.state_type,
            state_name=self.state_name,
            run_count=self.run_count,
            start_time=self.start_time,
            end_time=self.end_time,
            total_run_time=self.total_run_time.total_seconds(),
            expected_start_time=self.expected_start_time,
        )


class FlowRun(_RunBase):
    """A flow run as rules see it; mutations are persisted with the transition."""

    flow_name: str = ""
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    deployment_id: uuid.UUID | None = None
    parent_task_run_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    infrastructure_pid: str | None = None
    empirical_policy: FlowRunPolicy = Field(default_factory=FlowRunPolicy)

    @classmethod
    def from_spec(cls, run_id: uuid.UUID, spec: FlowRunSpec) -> FlowRun:
        return cls(id=run_id, **spec.model_dump(exclude={"deployment"}))


class TaskRun(_RunBase):
    """A task run as rules see it; mutations are persisted with the transition."""

    flow_run_id: uuid.UUID | None = None
    task_key: str = ""
    dynamic_key: str = ""
    cache_key: str | None = None
    cache_expiration: UtcDatetime | None = None
    task_inputs: dict[str, JsonValue] = Field(default_factory=dict)
    flow_run_run_count: int = 0
    empirical_policy: TaskRunPolicy = Field(default_factory=TaskRunPolicy)

    @classmethod
    def from_spec(cls, run_id: uuid.UUID, spec: TaskRunSpec) -> TaskRun:
        return cls(id=run_id, **spec.model_dump())
