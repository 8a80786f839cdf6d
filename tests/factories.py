"""Factories for rule scenarios: plain async functions with keyword overrides.

``initialize_orchestration`` mirrors the fixture of Prefect's own suite: it
creates a flow run (and a task run in it), force-commits the initial state
five seconds in the past through the minimal and global policies, and returns
a context proposing the given state, ready for rules to be entered by hand.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal, overload

from arbiter.rules.context import FlowOrchestrationContext, TaskOrchestrationContext
from arbiter.rules.engine import Orchestrator
from arbiter.rules.store import AdminStore
from arbiter.schemas import FlowRun, FlowRunPolicy, State, StateDetails, StateType, TaskRun
from arbiter.schemas.runs import TaskRunPolicy
from arbiter.schemas.states import utcnow

RunType = Literal["flow", "task"]


def make_state(
    type: StateType,
    *,
    name: str | None = None,
    timestamp: dt.datetime | None = None,
    details: dict[str, object] | None = None,
    data: object = None,
    message: str | None = None,
) -> State:
    """A state with Prefect's defaults; ``details`` are StateDetails fields."""
    return State(
        type=type,
        name=name or "",
        timestamp=timestamp or utcnow(),
        state_details=StateDetails.model_validate(details or {}),
        data=data,
        message=message,
    )


async def create_flow_run(
    store: AdminStore,
    *,
    retries: int | None = None,
    run_count: int = 0,
    resuming: bool = False,
    deployment_id: uuid.UUID | None = None,
    parent_task_run_id: uuid.UUID | None = None,
    infrastructure_pid: str | None = None,
    tags: list[str] | None = None,
) -> FlowRun:
    run = FlowRun(
        id=uuid.uuid4(),
        name="flow-run",
        flow_name="a-flow",
        run_count=run_count,
        deployment_id=deployment_id,
        parent_task_run_id=parent_task_run_id,
        infrastructure_pid=infrastructure_pid,
        tags=tags or [],
        empirical_policy=FlowRunPolicy(retries=retries, resuming=resuming),
    )
    await store.create_run("flow_run", run)
    return run


async def create_task_run(
    store: AdminStore,
    *,
    flow_run_id: uuid.UUID | None,
    tags: list[str] | None = None,
    retries: int | None = None,
    retry_delay: int | float | list[int] | list[float] | None = None,
    retry_jitter_factor: float | None = None,
    run_count: int = 0,
    flow_run_run_count: int = 0,
) -> TaskRun:
    run = TaskRun(
        id=uuid.uuid4(),
        name="task-run",
        task_key="a-task",
        flow_run_id=flow_run_id,
        tags=tags or [],
        run_count=run_count,
        flow_run_run_count=flow_run_run_count,
        empirical_policy=TaskRunPolicy(
            retries=retries, retry_delay=retry_delay, retry_jitter_factor=retry_jitter_factor
        ),
    )
    await store.create_run("task_run", run)
    return run


@overload
async def initialize_orchestration(
    store: AdminStore,
    run_type: Literal["flow"],
    initial_type: StateType | None,
    proposed_type: StateType | None,
    **options: object,
) -> FlowOrchestrationContext: ...


@overload
async def initialize_orchestration(
    store: AdminStore,
    run_type: Literal["task"],
    initial_type: StateType | None,
    proposed_type: StateType | None,
    **options: object,
) -> TaskOrchestrationContext: ...


async def initialize_orchestration(
    store: AdminStore,
    run_type: RunType,
    initial_type: StateType | None,
    proposed_type: StateType | None,
    **options: object,
) -> FlowOrchestrationContext | TaskOrchestrationContext:
    """A context for ``initial_type → proposed_type`` on a fresh run (see module docstring).

    Options (all optional): ``orchestrator``, ``run_override`` (an existing run),
    ``run_tags``, ``flow_retries``, ``flow_run_count``, ``resuming``, ``deployment_id``,
    ``infrastructure_pid``, ``initial_details``, ``initial_state_data``,
    ``initial_state_name``, ``proposed_details``, ``proposed_state_name``,
    ``proposed_state_data``, ``initial_flow_run_state_type``,
    ``initial_flow_run_state_details``, ``task_retries``, ``task_retry_delay``,
    ``task_run_count``, ``client_version``.
    """
    orchestrator = options.get("orchestrator") or Orchestrator()
    assert isinstance(orchestrator, Orchestrator)
    now = orchestrator.clock()

    def opt(name: str) -> object:
        return options.get(name)

    flow_run = await create_flow_run(
        store,
        retries=opt("flow_retries"),  # type: ignore[arg-type]
        run_count=opt("flow_run_count") or 0,  # type: ignore[arg-type]
        resuming=bool(opt("resuming")),
        deployment_id=opt("deployment_id"),  # type: ignore[arg-type]
        infrastructure_pid=opt("infrastructure_pid"),  # type: ignore[arg-type]
        tags=opt("run_tags") if run_type == "flow" else None,  # type: ignore[arg-type]
    )
    run: FlowRun | TaskRun
    override = opt("run_override")
    if isinstance(override, FlowRun | TaskRun):
        run = override
        if isinstance(opt("run_tags"), list):
            run.tags = list(opt("run_tags"))  # type: ignore[call-overload]
    elif run_type == "flow":
        run = flow_run
    else:
        flow_state_type = opt("initial_flow_run_state_type")
        if isinstance(flow_state_type, StateType):
            flow_details = opt("initial_flow_run_state_details") or {}
            await orchestrator.set_flow_run_state(
                store,
                flow_run,
                make_state(flow_state_type, details=flow_details),  # type: ignore[arg-type]
                force=True,
            )
        run = await create_task_run(
            store,
            flow_run_id=flow_run.id,
            tags=opt("run_tags"),  # type: ignore[arg-type]
            retries=opt("task_retries"),  # type: ignore[arg-type]
            retry_delay=opt("task_retry_delay"),  # type: ignore[arg-type]
            run_count=opt("task_run_count") or 0,  # type: ignore[arg-type]
        )

    if initial_type is not None:
        initial = make_state(
            initial_type,
            name=opt("initial_state_name"),  # type: ignore[arg-type]
            timestamp=now - dt.timedelta(seconds=5),
            details=opt("initial_details"),  # type: ignore[arg-type]
            data=opt("initial_state_data"),
        )
        if isinstance(run, FlowRun):
            await orchestrator.set_flow_run_state(store, run, initial, force=True)
        else:
            await orchestrator.set_task_run_state(store, run, initial, force=True)

    proposed = (
        make_state(
            proposed_type,
            name=opt("proposed_state_name"),  # type: ignore[arg-type]
            timestamp=now,
            details=opt("proposed_details"),  # type: ignore[arg-type]
            data=opt("proposed_state_data"),
        )
        if proposed_type is not None
        else None
    )
    common = {
        "store": store,
        "initial_state": run.state.model_copy(deep=True) if run.state else None,
        "proposed_state": proposed,
        "clock": orchestrator.clock,
        "settings": orchestrator.settings,
        "orchestrator": orchestrator,
    }
    client_version = opt("client_version")
    if isinstance(run, FlowRun):
        return FlowOrchestrationContext(
            run=run,
            client_version=client_version if isinstance(client_version, str) else None,
            **common,  # type: ignore[arg-type]
        )
    return TaskOrchestrationContext(run=run, **common)  # type: ignore[arg-type]
