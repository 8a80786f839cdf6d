"""PgStore's processed proposals against a real PostgreSQL: a record written with a batch is
found with its outcome and outbox, alone or with the batch's locked runs in one read; a
duplicate id is retryable, and purging removes only older records."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence

import pytest

from arbiter.rules.errors import StoreError
from arbiter.schemas import FlowRun
from arbiter.schemas.states import utcnow
from arbiter.worker.db.batch_store import BatchStore
from arbiter.worker.db.store import PgStore

pytestmark = pytest.mark.integration


async def record(
    store: PgStore,
    proposal_id: uuid.UUID,
    outcome: object,
    outbox: Sequence[object] | None = None,
    sha: str = "ab",
) -> None:
    """Record a proposal as a batch does: with the batch's other writes, in one statement."""
    batch = BatchStore(store, {})
    batch.record(
        proposal_id,
        sha * 32,
        ("task_run", uuid.uuid4()),
        "ACCEPT",
        json.dumps(outcome),
        json.dumps(list(outbox or [])),
    )
    await batch.flush()


class TestProcessedProposals:
    async def record(self, store: PgStore, proposal_id: uuid.UUID, outcome: object) -> None:
        await record(store, proposal_id, outcome)

    async def test_record_then_find(self, pg_store: PgStore) -> None:
        """A recorded proposal is found with its digest, status and outcome JSON."""
        proposal_id = uuid.uuid4()
        outcome = {"status": "ACCEPT", "state": {"name": "Running", "data": [1, "é", None]}}
        await self.record(pg_store, proposal_id, outcome)
        found = await pg_store.find_processed(proposal_id)
        assert found is not None
        assert found.body_sha256 == "ab" * 32
        assert found.status == "ACCEPT"
        assert json.loads(found.outcome_json) == outcome
        assert found.outbox_json == "[]"
        assert await pg_store.find_processed(uuid.uuid4()) is None

    async def test_a_batch_read_finds_its_locked_runs_and_replay_records_together(
        self, pg_store: PgStore
    ) -> None:
        """One read returns the runs (locked), the records of the proposal ids asked about
        (not others'), and the kind of each known id; a missing run is simply absent."""
        run = FlowRun(id=uuid.uuid4(), name="r")
        await pg_store.create_run("flow_run", run)
        proposal_id, other_id, missing = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await self.record(pg_store, other_id, {"status": "WAIT"})
        await self.record(pg_store, proposal_id, {"status": "ACCEPT"})
        read = await pg_store.read_batch(
            "flow_run",
            [run.id, missing],
            proposal_ids=[proposal_id, uuid.uuid4()],
            known_ids=[run.id, missing],
        )
        assert list(read.runs) == [run.id]
        assert read.runs[run.id].name == "r"
        assert list(read.processed) == [proposal_id]
        assert json.loads(read.processed[proposal_id].outcome_json) == {"status": "ACCEPT"}
        assert read.processed[proposal_id] == await pg_store.find_processed(proposal_id)
        assert read.kinds == {run.id: "flow_run"}
        wrong_kind = await pg_store.read_batch("task_run", [run.id])
        assert wrong_kind.runs == {}

    async def test_the_outbox_is_recorded_with_the_outcome(self, pg_store: PgStore) -> None:
        """What the transaction wanted published comes back, so a replay can publish it."""
        proposal_id = uuid.uuid4()
        outbox = [{"channel": "event", "routing_key": "k", "message_id": "m", "body": {"x": [1]}}]
        await record(pg_store, proposal_id, {}, outbox, sha="cd")
        found = await pg_store.find_processed(proposal_id)
        assert found is not None
        assert json.loads(found.outbox_json) == outbox

    async def test_recording_an_id_twice_is_retryable(self, pg_store: PgStore) -> None:
        """A duplicate id means a concurrent twin: the retry will find it and replay."""
        proposal_id = uuid.uuid4()
        await self.record(pg_store, proposal_id, {})
        with pytest.raises(StoreError) as caught:
            await self.record(pg_store, proposal_id, {})
        assert caught.value.retryable

    async def test_purge_removes_only_older_records(self, pg_store: PgStore) -> None:
        """Records processed before the cutoff go; newer ones stay."""
        proposal_id = uuid.uuid4()
        await self.record(pg_store, proposal_id, {})
        assert await pg_store.purge_processed(utcnow() - dt.timedelta(days=7)) >= 0
        assert await pg_store.find_processed(proposal_id) is not None
        assert await pg_store.purge_processed(utcnow() + dt.timedelta(minutes=1)) >= 1
        assert await pg_store.find_processed(proposal_id) is None
