"""PgStore's processed proposals against a real PostgreSQL: a record is found with its outcome
and outbox, together with the locked run in one call; a duplicate id is retryable, and purging
removes only older records."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from rules.errors import StoreError
from schemas import FlowRun
from schemas.states import utcnow
from worker.db.store import PgStore

pytestmark = pytest.mark.integration


class TestProcessedProposals:
    async def record(self, store: PgStore, proposal_id: uuid.UUID, outcome: object) -> None:
        await store.record_processed(
            proposal_id, "ab" * 32, "task_run", uuid.uuid4(), "ACCEPT", json.dumps(outcome)
        )

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

    async def test_lock_run_and_find_processed_reads_both_in_one_call(
        self, pg_store: PgStore
    ) -> None:
        """The run (locked) and the proposal's record come back together; either may be
        missing, and a record for another proposal id is not this one's."""
        run = FlowRun(id=uuid.uuid4(), name="r")
        await pg_store.create_run("flow_run", run)
        proposal_id, other_id = uuid.uuid4(), uuid.uuid4()
        assert await pg_store.lock_run_and_find_processed(
            "flow_run", uuid.uuid4(), proposal_id
        ) == (None, None)
        found_run, known = await pg_store.lock_run_and_find_processed(
            "flow_run", run.id, proposal_id
        )
        assert found_run is not None
        assert found_run.name == "r"
        assert known is None

        await self.record(pg_store, other_id, {"status": "WAIT"})
        await self.record(pg_store, proposal_id, {"status": "ACCEPT"})
        found_run, known = await pg_store.lock_run_and_find_processed(
            "flow_run", run.id, proposal_id
        )
        assert found_run is not None
        assert found_run.id == run.id
        assert known is not None
        assert json.loads(known.outcome_json) == {"status": "ACCEPT"}
        assert known == await pg_store.find_processed(proposal_id)
        wrong_kind = await pg_store.lock_run_and_find_processed("task_run", run.id, proposal_id)
        assert wrong_kind == (None, None)

    async def test_the_outbox_is_recorded_with_the_outcome(self, pg_store: PgStore) -> None:
        """What the transaction wanted published comes back, so a replay can publish it."""
        proposal_id = uuid.uuid4()
        outbox = [{"channel": "event", "routing_key": "k", "message_id": "m", "body": {"x": [1]}}]
        await pg_store.record_processed(
            proposal_id, "cd" * 32, "flow_run", uuid.uuid4(), "ACCEPT", "{}", json.dumps(outbox)
        )
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
