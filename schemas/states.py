"""States: the vocabulary every rule, message and table shares.

Mirrors Prefect's server-side ``State``/``StateDetails`` so executors that speak
Prefect see the same fields, names and defaults.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import uuid
from enum import StrEnum
from typing import Annotated

from pydantic import (
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import SchemaValidator, core_schema

from arbiter.schemas.copying import FastDeepCopy


class StateType(StrEnum):
    """The nine state types; the value equals the name, as in Prefect."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


TERMINAL_STATES: frozenset[StateType] = frozenset(
    {StateType.COMPLETED, StateType.CANCELLED, StateType.FAILED, StateType.CRASHED}
)


def default_name(state_type: StateType) -> str:
    """Prefect's default state name: the type in title case ("Running")."""
    return state_type.value.capitalize()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# RFC 3339's date-time, the offset optional (a naive time means UTC). The JSON Schema carries
# the same pattern, so executors and this check agree.
_RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})?$"
)
_RFC3339_MATCH = re.compile(_RFC3339).fullmatch  # fullmatch: `$` would allow a final "\n"
_PARSE_DATETIME = SchemaValidator(core_schema.datetime_schema())


def _utc_datetime(
    value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> dt.datetime:
    """A timestamp rules can compare with the aware clock and the database can store.

    From JSON it is an RFC 3339 string: pydantic alone also reads "1700000000" as Unix
    time. The string is parsed here because strict validation refuses a string that a
    validator hands on. A naive time means UTC; an aware one must exist in UTC (years 1
    to 9999), since the database driver converts to UTC.
    """
    if info.mode == "json" and isinstance(value, str):
        if _RFC3339_MATCH(value) is None:
            raise ValueError("timestamps must be RFC 3339 date-times, such as 2026-01-01T10:00:00Z")
        parsed: dt.datetime = _PARSE_DATETIME.validate_python(value)
    else:
        parsed = handler(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    if parsed.year in (1, 9999):  # only at the ends of the range can UTC fall outside it
        try:
            parsed.astimezone(dt.UTC)
        except OverflowError:
            raise ValueError("timestamps must fall within the years 1 to 9999 in UTC") from None
    return parsed


UtcDatetime = Annotated[
    dt.datetime,
    WrapValidator(_utc_datetime),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": _RFC3339}),
]


class StateDetails(FastDeepCopy):
    """Prefect's StateDetails; unknown keys are refused so typos surface."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    flow_run_id: uuid.UUID | None = None
    task_run_id: uuid.UUID | None = None
    child_flow_run_id: uuid.UUID | None = None
    scheduled_time: UtcDatetime | None = None
    cache_key: str | None = None
    cache_expiration: UtcDatetime | None = None
    deferred: bool | None = False
    untrackable_result: bool = False
    pause_timeout: UtcDatetime | None = None
    pause_reschedule: bool = False
    pause_key: str | None = None
    run_input_keyset: dict[str, str] | None = None
    refresh_cache: bool | None = None
    retriable: bool | None = None
    transition_id: uuid.UUID | None = None
    task_parameters_id: uuid.UUID | None = None
    traceparent: str | None = None
    deployment_concurrency_lease_id: uuid.UUID | None = None


class State(FastDeepCopy):
    """A state as the engine handles it: always with an id, a name and a timestamp."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: StateType
    name: str = ""
    timestamp: UtcDatetime = Field(default_factory=utcnow)
    message: str | None = None
    state_details: StateDetails = Field(default_factory=StateDetails)
    data: JsonValue = None

    def model_post_init(self, context: object, /) -> None:
        if not self.name:
            self.name = default_name(self.type)
        # Prefect gives every SCHEDULED state a scheduled time; rules rely on it.
        if self.type is StateType.SCHEDULED and self.state_details.scheduled_time is None:
            self.state_details.scheduled_time = self.timestamp

    def is_final(self) -> bool:
        return self.type in TERMINAL_STATES

    def fresh_copy(self, now: dt.datetime) -> State:
        """A deep copy with a new id, stamped ``now``: how a cached or mirrored state is reused."""
        clone = self.model_copy(deep=True)
        clone.id = uuid.uuid4()
        clone.timestamp = now
        return clone

    def deep_copy(self) -> State:
        return copy.deepcopy(self)
