"""Related resources: the run's flow, deployment, parent task run and tags."""

from __future__ import annotations

import uuid

import pytest

from arbiter.rules import instrumentation
from arbiter.rules.memory import InMemoryStore
from tests.factories import create_flow_run, create_task_run
from tests.unit.instrumentation.helpers import (
    RUNNING_TRANSITION,
    instrument,
    only_event,
    pending_to_running,
)


async def test_instrumenting_a_flow_run_with_no_flow(store: InMemoryStore) -> None:
    """A run without a known flow still emits its event, with no related flow."""
    run = await create_flow_run(store)
    run.flow_name = ""
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    event = only_event(ctx)
    assert event["event"] == "prefect.flow-run.Running"
    assert event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run.id}"
    assert event["related"] == []


async def test_instrumenting_a_deployed_flow_run_state_change(store: InMemoryStore) -> None:
    """A deployed run relates its flow, its deployment and its tags, in that order."""
    deployment_id = uuid.uuid4()
    run = await create_flow_run(store, deployment_id=deployment_id, tags=["test"])
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    assert only_event(ctx)["related"] == [
        {
            "prefect.resource.id": "prefect.flow.a-flow",
            "prefect.resource.role": "flow",
            "prefect.resource.name": "a-flow",
        },
        {
            "prefect.resource.id": f"prefect.deployment.{deployment_id}",
            "prefect.resource.role": "deployment",
        },
        {"prefect.resource.id": "prefect.tag.test", "prefect.resource.role": "tag"},
    ]


async def test_instrumenting_a_flow_with_tags(store: InMemoryStore) -> None:
    """Tags of the run and of its parent task run are related once each, sorted."""
    parent = await create_task_run(store, flow_run_id=None, tags=["task-run-one", "common-one"])
    run = await create_flow_run(
        store,
        deployment_id=uuid.uuid4(),
        parent_task_run_id=parent.id,
        tags=["flow-run-one", "common-one"],
    )
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    related = only_event(ctx)["related"]
    assert len(related) == 6  # the flow, the deployment, the parent task run and 3 tags
    assert [r["prefect.resource.id"] for r in related if r["prefect.resource.role"] == "tag"] == [
        "prefect.tag.common-one",
        "prefect.tag.flow-run-one",
        "prefect.tag.task-run-one",
    ]


async def test_instrumenting_a_subflow_run_relates_its_parent_task_run(
    store: InMemoryStore,
) -> None:
    """A subflow's event names the task run that stands for it in the parent flow."""
    parent = await create_task_run(store, flow_run_id=None)
    run = await create_flow_run(store, parent_task_run_id=parent.id)
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    assert only_event(ctx)["related"][-1] == {
        "prefect.resource.id": f"prefect.task-run.{parent.id}",
        "prefect.resource.role": "task-run",
        "prefect.resource.name": parent.name,
    }


async def test_related_tags_are_capped(
    store: InMemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tags fill the related resources up to the maximum, keeping one slot spare."""
    monkeypatch.setattr(instrumentation, "MAXIMUM_RELATED_RESOURCES", 4)
    run = await create_flow_run(store, tags=["d", "c", "b", "a"])
    ctx = pending_to_running(store, run)

    ctx = await instrument(ctx, RUNNING_TRANSITION)

    related = only_event(ctx)["related"]
    assert [r["prefect.resource.id"] for r in related] == [
        "prefect.flow.a-flow",
        "prefect.tag.a",
        "prefect.tag.b",
    ]
