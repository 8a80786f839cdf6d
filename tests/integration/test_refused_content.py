"""Content the database refuses (SQLSTATE classes 22 and 23) that escapes the decoder's checks:
answered INVALID ``unstorable`` with the database's reason on the first delivery, dead-lettered
with that reason, never requeued to fail the same way again; its batch neighbours commit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text

from arbiter.schemas import ErrorCode, Outcome, OutcomeStatus, StateType
from arbiter.worker.db.store import BatchRows, PgStore
from arbiter.worker.settings import Settings
from tests.fixtures.services import running_worker
from tests.integration.test_invalid_proposals import dead_letters
from tests.integration.test_worker_roundtrip import (
    OutcomeTap,
    history_of,
    proposal_body,
    publish_raw,
)

pytestmark = pytest.mark.integration

# A statement that fails with a data exception (22012) or an integrity violation (23502).
FAILING_SQL = {
    "22012": "SELECT 1 / 0",
    "23502": "INSERT INTO concurrency_limit (tag, concurrency_limit) VALUES (NULL, 1)",
}


def refuse_run_named(monkeypatch: pytest.MonkeyPatch, name: str, sql: str) -> Callable[[], int]:
    """Make writing a batch holding a new flow run called ``name`` send ``sql`` first, as if
    the database refused something in that proposal; returns how many transactions held it."""
    return refuse_run_named_in_batches(monkeypatch, name, sql, [])


def refuse_run_named_in_batches(
    monkeypatch: pytest.MonkeyPatch, name: str, sql: str, sizes: list[int]
) -> Callable[[], int]:
    """As ``refuse_run_named``, also noting in ``sizes`` how many new flow runs each failing
    write held (the culprit and the neighbours that failed with it)."""
    calls = 0
    real: Callable[..., Awaitable[None]] = PgStore.write_batch

    async def write_batch(self: PgStore, rows: BatchRows) -> None:
        nonlocal calls
        names = [json.loads(run)["name"] for run in rows.json["flow_run_new"]]
        if name in names:
            calls += 1
            sizes.append(len(names))
            await self._execute(text(sql))
        await real(self, rows)

    monkeypatch.setattr(PgStore, "write_batch", write_batch)
    return lambda: calls


@pytest.mark.parametrize("sqlstate", sorted(FAILING_SQL))
async def test_content_the_database_refuses_is_answered_invalid_once_and_dead_lettered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, sqlstate: str
) -> None:
    """One attempt, one INVALID answer naming the SQLSTATE, one dead letter saying why."""
    attempts = refuse_run_named(monkeypatch, "poison", FAILING_SQL[sqlstate])
    run_id = uuid.uuid4()
    body = json.dumps(proposal_body(run_id, StateType.PENDING, run={"name": "poison"})).encode()
    async with running_worker(settings), OutcomeTap(settings, "content.key") as tap:
        await publish_raw(settings, body, reply_to="content.key")
        outcome = Outcome.model_validate_json((await tap.next()).body)
        [dead] = await dead_letters(settings, 1)
        with pytest.raises(TimeoutError):
            await tap.next(timeout_s=1.0)
    assert outcome.status is OutcomeStatus.INVALID
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.UNSTORABLE
    assert sqlstate in outcome.error.message
    assert dead.body == body
    assert dead.headers["x-arbiter-error-code"] == "unstorable"
    assert sqlstate in str(dead.headers["x-arbiter-error-message"])
    assert attempts() == 1
    assert await history_of(settings, run_id) == []


async def test_a_refused_proposal_does_not_cost_its_neighbours(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid proposals published around a refused one are all accepted and written."""
    refuse_run_named(monkeypatch, "poison", FAILING_SQL["22012"])
    good = [uuid.uuid4() for _ in range(6)]
    bad = uuid.uuid4()
    async with running_worker(settings), OutcomeTap(settings, "content.key") as tap:
        for index, run_id in enumerate(good):
            if index == 3:
                poison = proposal_body(bad, StateType.PENDING, run={"name": "poison"})
                await publish_raw(settings, json.dumps(poison).encode(), reply_to="content.key")
            body = proposal_body(run_id, StateType.PENDING, run={"name": "fine"})
            await publish_raw(settings, json.dumps(body).encode(), reply_to="content.key")
        outcomes = [Outcome.model_validate_json((await tap.next()).body) for _ in range(7)]
    statuses = {outcome.run_id: outcome.status for outcome in outcomes}
    assert statuses == {
        **{run_id: OutcomeStatus.ACCEPT for run_id in good},
        bad: OutcomeStatus.INVALID,
    }
    for run_id in good:
        assert await history_of(settings, run_id) == ["Pending"]
    assert await history_of(settings, bad) == []


async def test_a_refused_proposal_inside_a_batch_is_split_out_and_its_neighbours_commit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nine proposals taken as one batch, the fifth refused by the database: the batch is
    split until the culprit is alone; it is INVALID unstorable, the eight others ACCEPT."""
    from arbiter.worker.metrics import WorkerMetrics
    from tests.integration.test_batches import (
        outcome_tap,
        publish_backlog,
        worker_taking_one_batch,
    )

    sizes: list[int] = []
    refuse_run_named_in_batches(monkeypatch, "poison", FAILING_SQL["22012"], sizes)
    run_ids = [uuid.uuid4() for _ in range(9)]
    documents = [
        proposal_body(run_id, StateType.PENDING, run={"name": "poison" if i == 4 else "fine"})
        for i, run_id in enumerate(run_ids)
    ]
    async with outcome_tap(settings) as tap:
        await publish_backlog(settings, [json.dumps(d).encode() for d in documents])
        async with worker_taking_one_batch(settings, WorkerMetrics(), len(documents)):
            outcomes = [Outcome.model_validate_json((await tap.next()).body) for _ in run_ids]
    statuses = {outcome.run_id: outcome.status for outcome in outcomes}
    assert statuses == {
        run_id: OutcomeStatus.INVALID if i == 4 else OutcomeStatus.ACCEPT
        for i, run_id in enumerate(run_ids)
    }
    assert sizes[0] == 9  # first tried with all its neighbours
    assert sizes[-1] == 1  # refused alone
    for i, run_id in enumerate(run_ids):
        assert await history_of(settings, run_id) == ([] if i == 4 else ["Pending"])
