"""What a batch reads and writes in its two statements, as ``PgStore.read_batch`` returns it
and ``PgStore.write_batch`` takes it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.worker.db import statements as sql

__all__ = ["BatchRead", "BatchRows", "ProcessedProposal"]


@dataclass(frozen=True)
class ProcessedProposal:
    """A proposal id already answered: its body's digest, the outcome it got and
    the messages its transaction published after commit."""

    body_sha256: str
    status: str
    outcome_json: str
    outbox_json: str = "[]"


@dataclass
class BatchRead:
    """What ``PgStore.read_batch`` found: runs by id, replay records by proposal id, and
    the kind of each known run id."""

    runs: dict[uuid.UUID, FlowRun | TaskRun] = field(default_factory=dict)
    processed: dict[uuid.UUID, ProcessedProposal] = field(default_factory=dict)
    kinds: dict[uuid.UUID, RunKind] = field(default_factory=dict)


@dataclass
class BatchRows:
    """A batch's writes as JSON objects (one text per row) for ``PgStore.write_batch``,
    and the rows each counted part must have written."""

    json: dict[str, list[str]] = field(
        default_factory=lambda: {name: [] for name in sql.WRITE_BATCH_PARTS}
    )
    expected: dict[str, int] = field(default_factory=dict)
