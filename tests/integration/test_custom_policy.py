"""A custom flow policy enabled by ARBITER_FLOW_POLICY, end to end on real services.

The worker imports ``tests.fixtures.custom_policy.TicketedFlowPolicy`` by its
path; its rule's decision comes back in the outcome, rule trace included.
"""

from __future__ import annotations

import uuid

import pytest
from pydantic import JsonValue

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.schemas.messages import Outcome, RuleEffect
from arbiter.worker.client import ArbiterClient
from arbiter.worker.runtime import ServiceError, build_orchestrator
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.custom_policy import MISSING_TICKET_REASON
from tests.fixtures.services import isolated_settings
from tests.integration.test_worker_roundtrip import history_of

POLICY_PATH = "tests.fixtures.custom_policy.TicketedFlowPolicy"


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return isolated_settings(services, database_url, flow_policy=POLICY_PATH)


async def start_run(
    client: ArbiterClient, *, tags: list[str], parameters: dict[str, JsonValue]
) -> Outcome:
    """Create a flow run (SCHEDULED), claim it (PENDING), then propose RUNNING."""
    run_id = uuid.uuid4()
    spec = FlowRunSpec(name="deploy", flow_name="release", tags=tags, parameters=parameters)
    outcome = await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=spec
    )
    assert outcome.status is OutcomeStatus.ACCEPT, outcome.details
    outcome = await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    assert outcome.status is OutcomeStatus.ACCEPT, outcome.details
    return await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))


@pytest.mark.integration
async def test_a_production_run_without_a_ticket_is_aborted(
    client: ArbiterClient, settings: Settings
) -> None:
    """ABORT with the rule's reason; its trace entry names it; RUNNING is never written."""
    outcome = await start_run(client, tags=["production"], parameters={"version": "1.2"})

    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == MISSING_TICKET_REASON
    assert [(e.rule, e.effect) for e in outcome.rule_trace] == [
        ("RequireTicketForProduction", RuleEffect.ABORT)
    ]
    assert outcome.rule_trace[0].reason == MISSING_TICKET_REASON
    assert outcome.run is not None
    assert outcome.run.state_type is StateType.PENDING
    assert outcome.run_id is not None
    assert await history_of(settings, outcome.run_id) == ["Scheduled", "Pending"]


@pytest.mark.integration
async def test_a_production_run_with_a_ticket_is_accepted(client: ArbiterClient) -> None:
    outcome = await start_run(client, tags=["production"], parameters={"ticket": "CHG-42"})

    assert outcome.status is OutcomeStatus.ACCEPT, outcome.details
    assert outcome.run is not None
    assert outcome.run.state_type is StateType.RUNNING
    assert all(e.rule != "RequireTicketForProduction" for e in outcome.rule_trace)


@pytest.mark.integration
async def test_a_non_production_run_is_accepted(client: ArbiterClient) -> None:
    outcome = await start_run(client, tags=["staging"], parameters={})

    assert outcome.status is OutcomeStatus.ACCEPT, outcome.details
    assert outcome.run is not None
    assert outcome.run.state_type is StateType.RUNNING


def test_a_bad_policy_path_names_the_setting() -> None:
    """No services needed: the import fails while the orchestrator is built."""
    with pytest.raises(ServiceError, match="ARBITER_FLOW_POLICY") as raised:
        build_orchestrator(Settings(flow_policy="no.such.Policy"))
    assert "no.such.Policy" in str(raised.value)


def test_the_example_policy_path_is_importable() -> None:
    orchestrator = build_orchestrator(Settings(flow_policy=POLICY_PATH))
    assert orchestrator.policies.flow.__name__ == "TicketedFlowPolicy"
