"""The closed set of orchestration outcomes and their typed details (Prefect's responses)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from arbiter.schemas.states import State


class SetStateStatus(StrEnum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


class StateAcceptDetails(BaseModel):
    type: Literal["accept_details"] = "accept_details"


class StateRejectDetails(BaseModel):
    type: Literal["reject_details"] = "reject_details"
    reason: str | None = None


class StateAbortDetails(BaseModel):
    type: Literal["abort_details"] = "abort_details"
    reason: str | None = None


class StateWaitDetails(BaseModel):
    type: Literal["wait_details"] = "wait_details"
    delay_seconds: int
    reason: str | None = None


StateResponseDetails = Annotated[
    StateAcceptDetails | StateRejectDetails | StateAbortDetails | StateWaitDetails,
    Field(discriminator="type"),
]


class OrchestrationResult(BaseModel):
    """What a transition produced; ``details`` decodes by its ``type`` literal."""

    state: State | None
    status: SetStateStatus
    details: StateResponseDetails
