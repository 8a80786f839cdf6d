"""ArbiterClient against a real worker: waits followed, duplicates dropped, timeouts and
refused publishes reported, nothing left pending."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import aio_pika
import pytest
from aiormq.exceptions import DeliveryError

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateDetails, StateType
from arbiter.schemas.states import utcnow
from arbiter.worker.client import ArbiterClient, OutcomeTimeoutError
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings

pytestmark = pytest.mark.integration


async def test_follow_waits_sleeps_through_a_wait_and_proposes_again(
    client: ArbiterClient,
) -> None:
    """RUNNING before the scheduled time is a WAIT; with follow_waits the pool parks the
    proposal and answers it once it may run: one ACCEPT for the one proposal sent."""
    run_id = uuid.uuid4()
    soon = utcnow() + dt.timedelta(seconds=1.5)
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=soon)
    )
    await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())
    await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    waited = await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))
    assert waited.status is OutcomeStatus.WAIT
    followed = await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.RUNNING), follow_waits=True
    )
    assert followed.status is OutcomeStatus.ACCEPT
    assert followed.proposal_id != waited.proposal_id
    # WaitForScheduledTime rounds the delay to whole seconds, as Prefect does, so a run
    # may start up to half a second early.
    assert utcnow() >= soon - dt.timedelta(seconds=0.5)


async def test_a_repeated_outcome_is_dropped(client: ArbiterClient) -> None:
    """The same proposal id published twice yields two outcomes (the second a replay); the
    client resolves the proposal once and counts the duplicate it dropped."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    pending = ProposedState(type=StateType.PENDING)
    first = await client.publish(
        "flow_run", run_id, pending, run=FlowRunSpec(), proposal_id=proposal_id
    )
    outcome = await asyncio.wait_for(first, 15)
    again = await client.publish(
        "flow_run", run_id, pending, run=FlowRunSpec(), proposal_id=proposal_id
    )
    for _ in range(150):
        if client.duplicates_dropped:
            break
        await asyncio.sleep(0.1)
    assert outcome.status is OutcomeStatus.ACCEPT
    assert client.duplicates_dropped == 1
    assert not again.done()  # never resolved twice: the first answer was the answer
    assert client.unanswered == 1


async def test_no_outcome_in_time_is_an_outcome_timeout(settings: Settings) -> None:
    """With no worker consuming, propose() gives up after timeout_s with a clear error and
    forgets the proposal."""
    async with ArbiterClient.connect(settings=settings) as client:
        with pytest.raises(OutcomeTimeoutError, match=r"within 0\.5 s"):
            await client.propose(
                "flow_run",
                uuid.uuid4(),
                ProposedState(type=StateType.PENDING),
                run=FlowRunSpec(),
                timeout_s=0.5,
            )
        assert client.unanswered == 0


async def test_a_publish_the_broker_refuses_raises(services: Services, database_url: str) -> None:
    """A full queue with ``x-overflow: reject-publish`` (as a max-length policy makes the
    proposals queue) nacks the publish: the client raises and keeps nothing pending."""
    settings = isolated_settings(services, database_url)
    async with ArbiterClient.connect(settings=settings) as client:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            proposals = await channel.get_exchange(settings.proposals_exchange)
            full = await channel.declare_queue(
                exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
            )
            await full.bind(proposals, routing_key=settings.proposals_routing_key)
            with pytest.raises(DeliveryError):
                await client.publish(
                    "flow_run",
                    uuid.uuid4(),
                    ProposedState(type=StateType.PENDING),
                    run=FlowRunSpec(),
                )
        assert client.unanswered == 0
