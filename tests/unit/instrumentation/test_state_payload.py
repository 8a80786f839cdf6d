"""A state in the event: long messages truncated, a pause's rescheduling stated."""

from __future__ import annotations

import pytest

from arbiter.rules import instrumentation
from arbiter.rules.instrumentation import state_payload
from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateDetails, StateType
from tests.unit.instrumentation.helpers import flow_context, instrument, only_event


async def test_resource_state_message_is_truncated(
    store: InMemoryStore, flow_run: FlowRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state-message label is truncated like the payload's message."""
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 10)
    message = "12345" + "x" * 40 + "ghijk"
    proposed = State(type=StateType.FAILED, message=message)

    ctx = await instrument(flow_context(store, flow_run, None, proposed), (None, StateType.FAILED))

    event = only_event(ctx)
    expected = "12345...40 additional characters...ghijk"
    assert event["resource"]["prefect.state-message"] == expected
    assert event["payload"]["validated_state"]["message"] == expected


TRUNCATION_CASES = [
    (None, None),
    ("", None),
    ("a", "a"),
    ("heyyy", "heyyy"),
    ("12345678901", "12345678901"),
    ("123456789012", "123456789012"),  # the cut would be longer than the message
    (
        "12345xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxghijk",
        "12345...39 additional characters...ghijk",
    ),
    (
        "12345xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxghijk",
        "12345...40 additional characters...ghijk",
    ),
]


@pytest.fixture
def odd_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 50_000 < instrumentation.TRUNCATE_STATE_MESSAGES_AT < 1_000_000
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 11)


@pytest.fixture
def even_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 50_000 < instrumentation.TRUNCATE_STATE_MESSAGES_AT < 1_000_000
    monkeypatch.setattr(instrumentation, "TRUNCATE_STATE_MESSAGES_AT", 10)


@pytest.mark.usefixtures("odd_truncation")
@pytest.mark.parametrize(("message", "expected"), TRUNCATION_CASES)
def test_truncating_state_messages_at_odd_length(message: str | None, expected: str | None) -> None:
    """Long messages keep their head and tail; an empty message is left out."""
    payload = state_payload(State(type=StateType.PENDING, name="Pending", message=message))

    assert payload is not None
    assert payload.get("message") == expected


@pytest.mark.usefixtures("even_truncation")
@pytest.mark.parametrize(("message", "expected"), TRUNCATION_CASES)
def test_truncating_state_messages_at_even_length(
    message: str | None, expected: str | None
) -> None:
    """The same with an even limit."""
    payload = state_payload(State(type=StateType.PENDING, name="Pending", message=message))

    assert payload is not None
    assert payload.get("message") == expected


def test_state_payload_paused_state() -> None:
    """A PAUSED state's payload says whether it reschedules."""
    payload = state_payload(
        State(
            type=StateType.PAUSED,
            name="Paused",
            state_details=StateDetails(pause_reschedule=True),
        )
    )

    assert payload is not None
    assert payload["pause_reschedule"] == "true"
