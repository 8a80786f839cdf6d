"""The batch's write statement against a real PostgreSQL: values travel as JSON rows, so
every type must read back as it went in, whatever Python allowed on the way."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.schemas import State, StateType, TaskRun
from arbiter.worker.db.batch_store import BatchStore
from arbiter.worker.db.store import PgStore

pytestmark = pytest.mark.integration

FAR_WEST = dt.timezone(-dt.timedelta(hours=23, minutes=59))


async def test_times_with_offsets_postgresql_cannot_read_are_written_as_the_same_instant(
    pg_store: PgStore,
) -> None:
    """Python allows offsets up to 23:59 and PostgreSQL reads up to 15:59: a state's time
    and a run's times at -23:59 are stored, and read back as the same instants."""
    stamp = dt.datetime(2026, 12, 3, 8, 0, 0, 123456, tzinfo=FAR_WEST)
    run = TaskRun(id=uuid.uuid4(), start_time=stamp, total_run_time=dt.timedelta(seconds=1.5))
    state = State(type=StateType.RUNNING, timestamp=stamp)
    batch = BatchStore(pg_store, {("task_run", run.id): run}, {("task_run", run.id): 0})
    await batch.insert_state("task_run", run, state)
    run.state = state
    await batch.save_run("task_run", run)
    await batch.flush()

    [stored] = await pg_store.read_history("task_run", run.id)
    read = await pg_store.read_task_run(run.id)
    assert stored.timestamp == stamp
    assert read is not None
    assert read.start_time == stamp
    assert read.total_run_time == dt.timedelta(seconds=1.5)
