"""A worker's Prometheus endpoint: outcomes by status, rule effects by rule, latency,
replays, INVALID codes, and a clear error when the port cannot be served."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateDetails, StateType
from arbiter.schemas.states import utcnow
from arbiter.worker.client import ArbiterClient
from arbiter.worker.runtime import ServiceError
from arbiter.worker.service import run_worker
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_worker_roundtrip import OutcomeTap, proposal_body, publish_raw

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on ``/metrics``, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_outcomes_rule_effects_replays_and_invalid_proposals(
    services: Services, database_url: str
) -> None:
    """Two ACCEPTs, a WAIT by WaitForScheduledTime, a replay and a malformed proposal each
    show up under their labels; the latency histogram counts every settled delivery."""
    port = free_port()
    settings = isolated_settings(services, database_url, metrics_port=port)
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    later = utcnow() + dt.timedelta(hours=1)
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=later)
    )
    async with running_worker(settings), ArbiterClient.connect(settings=settings) as client:
        assert (await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())).status is (
            OutcomeStatus.ACCEPT
        )
        pending = proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id)
        async with OutcomeTap(settings, "metrics.replay") as tap:
            for _ in range(2):  # the second is a replay
                await publish_raw(settings, json.dumps(pending).encode(), reply_to="metrics.replay")
                await tap.next()
            await publish_raw(settings, b"{not json", reply_to="metrics.replay")
            await tap.next()
        waited = await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))
        assert waited.status is OutcomeStatus.WAIT
        samples = await asyncio.to_thread(scrape, port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("arbiter_outcomes_total", run_kind="flow_run", status="ACCEPT") == 3
    assert value("arbiter_outcomes_total", run_kind="flow_run", status="WAIT") == 1
    assert value("arbiter_outcomes_total", run_kind="unknown", status="INVALID") == 1
    assert value("arbiter_replays_total") == 1
    assert value("arbiter_invalid_proposals_total", code="malformed_json") == 1
    assert value("arbiter_rule_effects_total", rule="WaitForScheduledTime", effect="wait") == 1
    assert value("arbiter_proposal_seconds_count", run_kind="flow_run") == 4
    assert value("arbiter_in_flight") == 0
    assert value("arbiter_requeued_total") == 0


async def test_metrics_are_off_unless_a_port_is_set(services: Services, database_url: str) -> None:
    """No ARBITER_METRICS_PORT: the worker listens on nothing but the broker."""
    settings = isolated_settings(services, database_url)
    assert settings.metrics_port is None
    port = free_port()
    async with running_worker(settings):
        with pytest.raises(urllib.error.URLError, match="refused"):
            await asyncio.to_thread(scrape, port)


async def test_a_port_in_use_is_a_clear_error_naming_the_setting(
    services: Services, database_url: str
) -> None:
    """The metrics port is bound before anything else starts, so a taken port fails fast."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        settings = isolated_settings(services, database_url, metrics_port=port)
        with pytest.raises(ServiceError, match=f"ARBITER_METRICS_PORT.*{port}"):
            await run_worker(settings)


async def test_the_debug_log_has_a_line_per_decision_naming_its_rules(
    services: Services, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG each settled proposal logs its status, the state written and the rules
    that changed it; a replay says so."""
    settings = isolated_settings(services, database_url)
    run_id = uuid.uuid4()
    later = utcnow() + dt.timedelta(hours=1)
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=later)
    )
    caplog.set_level(logging.DEBUG, logger="arbiter.worker.consumer")
    async with running_worker(settings), ArbiterClient.connect(settings=settings) as client:
        await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())
        await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
        waited = await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))
    assert waited.status is OutcomeStatus.WAIT
    lines = [r.getMessage() for r in caplog.records if f"flow_run {run_id}" in r.getMessage()]
    assert len(lines) == 3
    assert "ACCEPT -> SCHEDULED 'Scheduled' [no rule]" in lines[0]
    assert "ACCEPT -> PENDING 'Pending' [CopyScheduledTime mutate]" in lines[1]
    assert "WAIT -> PENDING 'Pending' [WaitForScheduledTime wait]" in lines[2]
