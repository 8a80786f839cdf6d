"""The orchestration loop: choose a policy, nest its rules, validate, unwind.

This is Prefect's ``set_flow_run_state``/``set_task_run_state`` without the
database session: the caller hands in a ``Store`` bound to its transaction and
the already locked run, and commits (or rolls back) afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.rules.context import (
    Clock,
    FlowOrchestrationContext,
    OrchestrationContext,
    RuleSettings,
    TaskOrchestrationContext,
)
from arbiter.rules.policy import BaseOrchestrationPolicy
from arbiter.rules.results import OrchestrationResult
from arbiter.rules.store import Store
from arbiter.schemas.runs import FlowRun, TaskRun
from arbiter.schemas.states import State, utcnow


@dataclass(frozen=True)
class PolicySet:
    """Which policy governs which kind of transition (reference §1.6)."""

    flow: type[BaseOrchestrationPolicy]
    task: type[BaseOrchestrationPolicy]
    minimal_flow: type[BaseOrchestrationPolicy]
    minimal_task: type[BaseOrchestrationPolicy]
    background_task: type[BaseOrchestrationPolicy]
    global_flow: type[BaseOrchestrationPolicy]
    global_task: type[BaseOrchestrationPolicy]

    def for_flow(self, *, force: bool) -> type[BaseOrchestrationPolicy]:
        return self.minimal_flow if force else self.flow

    def for_task(self, proposed: State, *, force: bool) -> type[BaseOrchestrationPolicy]:
        # A deferred (background) task state wins over force, as in Prefect.
        if proposed.state_details.deferred:
            return self.background_task
        return self.minimal_task if force else self.task


def default_policies() -> PolicySet:
    from arbiter.rules import policies

    return PolicySet(
        flow=policies.CoreFlowPolicy,
        task=policies.CoreTaskPolicy,
        minimal_flow=policies.MinimalFlowPolicy,
        minimal_task=policies.MinimalTaskPolicy,
        background_task=policies.BackgroundTaskPolicy,
        global_flow=policies.GlobalFlowPolicy,
        global_task=policies.GlobalTaskPolicy,
    )


CURRENT_CLIENT_VERSION = "3.5.0"


@dataclass(frozen=True)
class Orchestrator:
    """Everything a transition needs besides the store and the run: policies, clock, settings."""

    policies: PolicySet = field(default_factory=default_policies)
    clock: Clock = utcnow
    settings: RuleSettings = field(default_factory=RuleSettings)
    # The client version flow transitions are decided for. Arbiter's executors speak the
    # current protocol (they renew deployment leases), so the worker decides as for a
    # current Prefect client; None would mean Prefect's default for an unknown client, 2.0.0.
    client_version: str | None = CURRENT_CLIENT_VERSION

    async def set_flow_run_state(
        self, store: Store, run: FlowRun, proposed: State | None, *, force: bool = False
    ) -> FlowOrchestrationContext:
        """Orchestrate one flow-run transition and save the run; re-raises a rule's error."""
        context = FlowOrchestrationContext(
            store=store,
            run=run,
            initial_state=run.state.model_copy(deep=True) if run.state else None,
            proposed_state=proposed,
            clock=self.clock,
            settings=self.settings,
            orchestrator=self,
            client_version=self.client_version,
        )
        await orchestrate(context, self.policies.for_flow(force=force), self.policies.global_flow)
        await store.save_run("flow_run", run)
        return context

    async def set_task_run_state(
        self, store: Store, run: TaskRun, proposed: State | None, *, force: bool = False
    ) -> TaskOrchestrationContext:
        """Orchestrate one task-run transition and save the run; re-raises a rule's error."""
        policy = (
            self.policies.for_task(proposed, force=force)
            if proposed is not None
            else self.policies.minimal_task
        )
        context = TaskOrchestrationContext(
            store=store,
            run=run,
            initial_state=run.state.model_copy(deep=True) if run.state else None,
            proposed_state=proposed,
            clock=self.clock,
            settings=self.settings,
            orchestrator=self,
        )
        await orchestrate(context, policy, self.policies.global_task)
        await store.save_run("task_run", run)
        return context


async def orchestrate(
    context: OrchestrationContext,  # type: ignore[type-arg]
    policy: type[BaseOrchestrationPolicy],
    global_policy: type[BaseOrchestrationPolicy],
) -> OrchestrationResult:
    """Enter the policy's rules, then the global transforms, validate innermost, unwind.

    A rule's before-hook error aborts the transition; it is re-raised once every
    rule has unwound (cleanups ran), so the caller rolls the transaction back.
    """
    intended = (context.initial_state_type, context.proposed_state_type)
    rules = [
        *policy.compile_transition_rules(*intended),
        *global_policy.compile_transition_rules(*intended),
    ]
    # What ``contextlib.AsyncExitStack`` does, less its bookkeeping (a tenth of the rules'
    # cost): enter in order; unwind what was entered in reverse, each exit told of the
    # error raised so far (entering, validating or a later exit), which then propagates.
    entered = []
    error: BaseException | None = None
    try:
        for rule_class in rules:
            rule = rule_class(context, *intended)
            context = await rule.__aenter__()
            entered.append(rule)
        await context.validate_proposed_state()
    except BaseException as exc:
        error = exc
    for rule in reversed(entered):
        try:
            if error is None:
                await rule.__aexit__(None, None, None)
            else:
                await rule.__aexit__(type(error), error, error.__traceback__)
        except BaseException as exc:
            if error is not None and exc is not error and exc.__context__ is None:
                exc.__context__ = error
            error = exc
    if error is not None:
        raise error
    if context.orchestration_error is not None:
        raise context.orchestration_error
    return context.result()
