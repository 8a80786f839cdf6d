"""An in-memory Store: the same contract as PostgreSQL, for unit tests and experiments.

It has no transactions: a caller that wants rollback semantics uses the real
store. Runs are kept as the very objects rules mutate, so there is nothing to
flush.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass, field

from arbiter.rules.store import Deployment, GlobalLimit, TagLimit, deployment_limit_name
from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import State, StateType


@dataclass
class _CacheEntry:
    cache_key: str
    expiration: dt.datetime | None
    state_id: uuid.UUID
    seq: int


@dataclass
class InMemoryStore:
    """Flow runs, task runs, state history, the task cache and tag limits, in dicts."""

    flow_runs: dict[uuid.UUID, FlowRun] = field(default_factory=dict)
    task_runs: dict[uuid.UUID, TaskRun] = field(default_factory=dict)
    states: dict[uuid.UUID, State] = field(default_factory=dict)
    history: dict[uuid.UUID, list[State]] = field(default_factory=dict)
    cache: list[_CacheEntry] = field(default_factory=list)
    tag_limits: dict[str, TagLimit] = field(default_factory=dict)
    global_limits: dict[str, GlobalLimit] = field(default_factory=dict)
    deployments: dict[uuid.UUID, Deployment] = field(default_factory=dict)

    def add_flow_run(self, run: FlowRun) -> FlowRun:
        self.flow_runs[run.id] = run
        return run

    def add_task_run(self, run: TaskRun) -> TaskRun:
        self.task_runs[run.id] = run
        return run

    async def read_flow_run(self, run_id: uuid.UUID) -> FlowRun | None:
        return self.flow_runs.get(run_id)

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        return self.task_runs.get(run_id)

    async def lock_task_run(self, run_id: uuid.UUID) -> TaskRun | None:
        return self.task_runs.get(run_id)

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        stored = state.model_copy(deep=True)
        self.states[state.id] = stored
        self.history.setdefault(run.id, []).append(stored)

    async def save_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        if isinstance(run, FlowRun):
            self.flow_runs[run.id] = run
        else:
            self.task_runs[run.id] = run

    async def flow_state_timestamp_taken(self, run_id: uuid.UUID, timestamp: dt.datetime) -> bool:
        return any(s.timestamp == timestamp for s in self.history.get(run_id, []))

    async def find_cached_state(self, cache_key: str, now: dt.datetime) -> State | None:
        live = [
            entry
            for entry in self.cache
            if entry.cache_key == cache_key and (entry.expiration is None or entry.expiration > now)
        ]
        for entry in sorted(live, key=lambda e: e.seq, reverse=True):
            state = self.states.get(entry.state_id)
            if state is not None and state.type is StateType.COMPLETED:
                return state.model_copy(deep=True)
        return None

    async def insert_cache_entry(
        self, cache_key: str, expiration: dt.datetime | None, state_id: uuid.UUID
    ) -> None:
        self.cache.append(_CacheEntry(cache_key, expiration, state_id, seq=len(self.cache)))

    async def lock_tag_limits(self, tags: list[str]) -> list[TagLimit]:
        return [
            limit.copy()
            for tag in sorted(set(tags))
            if (limit := self.tag_limits.get(tag)) is not None
        ]

    async def save_tag_limit(self, limit: TagLimit) -> None:
        if limit.tag in self.tag_limits:
            self.tag_limits[limit.tag].active_slots = list(limit.active_slots)
            self.tag_limits[limit.tag].expires = dict(limit.expires)

    async def read_deployment(self, deployment_id: uuid.UUID) -> Deployment | None:
        found = self.deployments.get(deployment_id)
        return dataclasses.replace(found) if found is not None else None

    async def lock_global_limits(self, names: list[str]) -> list[GlobalLimit]:
        return [
            limit.copy()
            for name in sorted(set(names))
            if (limit := self.global_limits.get(name)) is not None
        ]

    async def save_global_limit(self, limit: GlobalLimit) -> None:
        if (existing := self.global_limits.get(limit.name)) is not None:
            saved = limit.copy()
            saved.limit, saved.active = existing.limit, existing.active
            saved.slot_decay_per_second = existing.slot_decay_per_second
            self.global_limits[limit.name] = saved

    async def create_run(self, kind: RunKind, run: FlowRun | TaskRun) -> None:
        await self.save_run(kind, run)

    async def read_history(self, kind: RunKind, run_id: uuid.UUID) -> list[State]:
        return [s.model_copy(deep=True) for s in self.history.get(run_id, [])]

    async def upsert_tag_limit(self, tag: str, limit: int) -> None:
        existing = self.tag_limits.get(tag)
        if existing is None:
            self.tag_limits[tag] = TagLimit(tag=tag, limit=limit)
        else:
            existing.limit = limit

    async def delete_tag_limit(self, tag: str) -> bool:
        return self.tag_limits.pop(tag, None) is not None

    async def list_tag_limits(self) -> list[TagLimit]:
        return [t.copy() for t in sorted(self.tag_limits.values(), key=lambda t: t.tag)]

    async def upsert_global_limit(
        self, name: str, limit: int, *, active: bool = True, slot_decay_per_second: float = 0.0
    ) -> None:
        existing = self.global_limits.get(name)
        if existing is None:
            self.global_limits[name] = GlobalLimit(
                name, limit, active, slot_decay_per_second=slot_decay_per_second
            )
        else:
            existing.limit, existing.active = limit, active
            existing.slot_decay_per_second = slot_decay_per_second

    async def delete_global_limit(self, name: str) -> bool:
        return self.global_limits.pop(name, None) is not None

    async def list_global_limits(self) -> list[GlobalLimit]:
        return [self.global_limits[name].copy() for name in sorted(self.global_limits)]

    async def upsert_deployment(self, deployment: Deployment) -> None:
        self.deployments[deployment.id] = dataclasses.replace(deployment)
        name = deployment_limit_name(deployment.id)
        if deployment.concurrency_limit is None:
            self.global_limits.pop(name, None)
        else:
            await self.upsert_global_limit(name, deployment.concurrency_limit)

    async def delete_deployment(self, deployment_id: uuid.UUID) -> bool:
        self.global_limits.pop(deployment_limit_name(deployment_id), None)
        return self.deployments.pop(deployment_id, None) is not None

    async def list_deployments(self) -> list[Deployment]:
        return [
            dataclasses.replace(d)
            for d in sorted(self.deployments.values(), key=lambda d: (d.name, str(d.id)))
        ]
