"""Deployment concurrency end to end: flow runs name their deployment (and its limit) in
their description, a worker decides, `arbiter deployments` administers."""

from __future__ import annotations

import json
import uuid

import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.schemas.runs import DeploymentSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from tests.integration.test_cli import arbiter

pytestmark = pytest.mark.integration


async def scheduled_then_pending(
    client: ArbiterClient, deployment: DeploymentSpec
) -> tuple[uuid.UUID, OutcomeStatus, str | None]:
    """A new flow run of the deployment, SCHEDULED then proposed PENDING: its id, the
    PENDING outcome's status and the state the run is in afterwards."""
    run_id = uuid.uuid4()
    spec = FlowRunSpec(name="r", deployment=deployment)
    await client.propose("flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=spec)
    outcome = await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    assert outcome.state is not None
    return run_id, outcome.status, outcome.state.name


async def test_enqueue_sends_the_extra_run_back_to_wait_for_a_slot(
    client: ArbiterClient, settings: Settings
) -> None:
    """Limit 2, ENQUEUE: two runs PENDING, the third Scheduled "AwaitingConcurrencySlot";
    once one completes, the third gets PENDING; `deployments ls` shows the holders."""
    deployment = DeploymentSpec(id=uuid.uuid4(), name="etl", concurrency_limit=2)
    first = await scheduled_then_pending(client, deployment)
    second = await scheduled_then_pending(client, deployment)
    third_id, third_status, third_state = await scheduled_then_pending(client, deployment)

    assert (first[1], second[1]) == (OutcomeStatus.ACCEPT, OutcomeStatus.ACCEPT)
    assert (third_status, third_state) == (OutcomeStatus.REJECT, "AwaitingConcurrencySlot")
    listed = json.loads(arbiter(settings, "deployments", "ls", "--json").stdout)
    [row] = [r for r in listed if r["id"] == str(deployment.id)]
    assert (row["name"], row["concurrency_limit"], row["active_slots"]) == ("etl", 2, 2)
    assert row["holders"] == sorted([str(first[0]), str(second[0])])

    for state in (StateType.RUNNING, StateType.COMPLETED):
        done = await client.propose("flow_run", first[0], ProposedState(type=state))
        assert done.status is OutcomeStatus.ACCEPT
    again = await client.propose("flow_run", third_id, ProposedState(type=StateType.PENDING))
    assert again.status is OutcomeStatus.ACCEPT
    assert again.state is not None
    assert again.state.state_details.deployment_concurrency_lease_id is not None


async def test_cancel_new_cancels_the_extra_run(client: ArbiterClient) -> None:
    deployment = DeploymentSpec(
        id=uuid.uuid4(), concurrency_limit=1, collision_strategy="CANCEL_NEW"
    )
    _, status, _ = await scheduled_then_pending(client, deployment)
    _, refused, state = await scheduled_then_pending(client, deployment)

    assert status is OutcomeStatus.ACCEPT
    assert (refused, state) == (OutcomeStatus.REJECT, "Cancelled")


def test_deployments_set_ls_rm(settings: Settings) -> None:
    deployment_id = str(uuid.uuid4())
    made = arbiter(
        settings,
        "deployments",
        "set",
        deployment_id,
        "--name",
        "nightly",
        "--limit",
        "4",
        "--collision-strategy",
        "CANCEL_NEW",
        "--grace-period-seconds",
        "600",
    )
    assert made.returncode == 0, made.stderr
    listed = json.loads(arbiter(settings, "deployments", "ls", "--json").stdout)
    [row] = [r for r in listed if r["id"] == deployment_id]
    assert row == {
        "id": deployment_id,
        "name": "nightly",
        "concurrency_limit": 4,
        "collision_strategy": "CANCEL_NEW",
        "grace_period_seconds": 600,
        "active_slots": 0,
        "holders": [],
    }
    limits = json.loads(arbiter(settings, "limits", "ls", "--global", "--json").stdout)
    assert f"deployment:{deployment_id}" in {lim["name"] for lim in limits}
    assert "nightly" in arbiter(settings, "deployments", "ls").stdout
    assert arbiter(settings, "deployments", "rm", deployment_id).returncode == 0
    assert arbiter(settings, "deployments", "rm", deployment_id).returncode == 1
    limits = json.loads(arbiter(settings, "limits", "ls", "--global", "--json").stdout)
    assert f"deployment:{deployment_id}" not in {lim["name"] for lim in limits}
    bad = arbiter(settings, "deployments", "set", deployment_id, "--grace-period-seconds", "5")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
