"""Wire messages: the proposal an executor publishes and the outcome a worker returns.

docs/protocol.md is the contract; the JSON Schema files in ``schemas/jsonschema``
are generated from these models (``python -m arbiter.schemas.export``) and a test fails
when the two drift apart.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import to_json

from arbiter.schemas.runs import FlowRunSpec, RunKind, RunSummary, TaskRunSpec
from arbiter.schemas.states import State, StateDetails, StateType, UtcDatetime

SCHEMA_VERSION = 1


class ProposedState(BaseModel):
    """The state an executor asks for; name and timestamp default on the worker."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: StateType
    name: str | None = None
    timestamp: UtcDatetime | None = None
    message: str | None = None
    state_details: StateDetails = Field(default_factory=StateDetails)
    data: JsonValue = None

    def to_state(self, now: dt.datetime) -> State:
        """The engine's State: the worker's clock fills a missing timestamp."""
        return State(
            type=self.type,
            name=self.name or "",
            timestamp=self.timestamp or now,
            message=self.message,
            state_details=self.state_details.model_copy(deep=True),
            data=self.data,
        )


def _not_bool_or_float(value: object) -> object:
    """``Literal[1]`` takes ``true`` and ``1.0`` (equal to 1 in Python), even when strict."""
    if isinstance(value, bool | float):
        raise ValueError("Input should be the integer 1")
    return value


class Proposal(BaseModel):
    """A request to move one run into a new state (docs/protocol.md §2).

    Read strictly: a boolean is not an integer, 1.0 and "1" are not 1, an enum is one of
    its strings, and a timestamp is an RFC 3339 string.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: Annotated[Literal[1], BeforeValidator(_not_bool_or_float)]
    proposal_id: uuid.UUID
    run_kind: RunKind
    run_id: uuid.UUID
    state: ProposedState
    force: bool = False
    run: FlowRunSpec | TaskRunSpec | None = None
    # Server-side WAIT following (docs/protocol.md §4.8): the pool parks the proposal after
    # a WAIT and re-evaluates it after the delay, answering once with the final outcome.
    follow_waits: bool = False
    max_wait_s: float | None = Field(default=None, gt=0)
    wait_notices: bool = False
    # An explicit lease renewal (docs/protocol.md §4.9): no state is written, the run's
    # slots' leases are renewed; ``state`` is not read.
    renew_leases: bool = False

    @field_validator("run", mode="wrap")
    @classmethod
    def _run_matches_kind(
        cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> FlowRunSpec | TaskRunSpec | None:
        # Decode `run` by `run_kind` rather than by shape, so a task description is
        # never silently read as a flow run (both have `name` and `tags`).
        kind = info.data.get("run_kind")
        if isinstance(value, dict) and kind in ("flow_run", "task_run"):
            spec = FlowRunSpec if kind == "flow_run" else TaskRunSpec
            if info.mode == "json":
                # JSON is the wire, and the wire is read strictly: the spec is read from JSON
                # too, since python mode would take "1" or true for 1, and strict python
                # mode would refuse the strings that UUIDs and timestamps arrive as.
                return spec.model_validate_json(to_json(value), strict=True)
            return spec.model_validate(value)
        result: FlowRunSpec | TaskRunSpec | None = handler(value)
        return result


class OutcomeStatus(StrEnum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    WAIT = "WAIT"
    ABORT = "ABORT"
    INVALID = "INVALID"


class ErrorCode(StrEnum):
    """Why a proposal is INVALID, or why it was given up with an ABORT (``delivery_limit``)."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_RUN = "unknown_run"
    KIND_MISMATCH = "kind_mismatch"
    TOO_LARGE = "too_large"
    PROPOSAL_ID_CONFLICT = "proposal_id_conflict"
    # INVALID: PostgreSQL refused the proposal's content (SQLSTATE class 22 or 23).
    UNSTORABLE = "unstorable"
    # ABORT: the proposal failed on every delivery the queue allows; the message is the
    # last error. It is dead-lettered after this answer.
    DELIVERY_LIMIT = "delivery_limit"


class OutcomeDetails(BaseModel):
    reason: str | None = None
    delay_seconds: int | None = None
    # A WAIT the pool follows itself: an interim notice, the final outcome comes later.
    parked: bool = False


class RuleEffect(StrEnum):
    REJECT = "reject"
    WAIT = "wait"
    ABORT = "abort"
    RENAME = "rename"
    MUTATE = "mutate"
    FIZZLE = "fizzle"
    CLEANUP = "cleanup"


class RuleTraceEntry(BaseModel):
    """One rule or transform that changed the transition, and how."""

    rule: str
    effect: RuleEffect
    reason: str | None = None


class OutcomeError(BaseModel):
    code: ErrorCode
    message: str


class Outcome(BaseModel):
    """The worker's answer to one proposal (docs/protocol.md §3)."""

    schema_version: Literal[1] = 1
    proposal_id: uuid.UUID | None
    run_kind: RunKind | None
    run_id: uuid.UUID | None
    status: OutcomeStatus
    state: State | None = None
    details: OutcomeDetails = Field(default_factory=OutcomeDetails)
    run: RunSummary | None = None
    rule_trace: list[RuleTraceEntry] = Field(default_factory=list)
    error: OutcomeError | None = None

    def routing_key(self) -> str:
        """``outcome.<run_kind>.<status>``, used when the proposal named no reply_to."""
        return f"outcome.{self.run_kind or 'unknown'}.{self.status.value.lower()}"
