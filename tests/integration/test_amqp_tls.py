"""RabbitMQ over TLS: ``amqps://`` with ``cafile``, ``certfile`` and ``keyfile`` on the URL
(aiormq's own options), against a private node with a TLS listener that verifies its peers
and wants a client certificate, all made here."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.runtime import ServiceError, connect_broker
from arbiter.worker.settings import Settings
from tests.fixtures.certs import make_certificates
from tests.fixtures.services import running_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TlsBroker:
    port: int
    certs: Path

    def url(self, *, ca: str = "ca.pem", client_cert: bool = True) -> str:
        query = f"cafile={self.certs / ca}"
        if client_cert:
            query += f"&certfile={self.certs / 'client.pem'}&keyfile={self.certs / 'client.key'}"
        return f"amqps://arbiter:arbiter@127.0.0.1:{self.port}/?{query}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    certs = tmp_path_factory.mktemp("amqp-certs")
    make_certificates(certs)
    port = free_port()
    extra = "\n".join(
        [
            f"listeners.ssl.default = 127.0.0.1:{port}",
            f"ssl_options.cacertfile = {certs / 'ca.pem'}",
            f"ssl_options.certfile = {certs / 'server.pem'}",
            f"ssl_options.keyfile = {certs / 'server.key'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
        ]
    )
    started = subprocess.run(
        ["bash", str(ROOT / "deploy" / "start-rabbitmq.sh")],
        capture_output=True, text=True, check=True, timeout=240,
        env={**os.environ, "RMQ_PORT": "", "RMQ_CONF_EXTRA": extra},
    )  # fmt: skip
    exports = dict(
        part.split("=", 1)
        for line in started.stdout.splitlines()
        for part in shlex.split(line.removeprefix("export "))
    )
    try:
        yield TlsBroker(port=port, certs=certs)
    finally:
        subprocess.run(["bash", "-c", exports["RABBITMQ_STOP"]], check=False, timeout=120)


async def test_a_worker_and_an_executor_settle_a_proposal_over_tls(
    settings: Settings, tls_broker: TlsBroker
) -> None:
    over_tls = settings.model_copy(update={"amqp_url": tls_broker.url()})
    async with (
        running_worker(over_tls),
        ArbiterClient.connect(settings=over_tls) as client,
    ):
        outcome = await client.propose(
            "flow_run",
            uuid.uuid4(),
            ProposedState(type=StateType.SCHEDULED),
            run=FlowRunSpec(name="tls", flow_name="f"),
        )
    assert outcome.status is OutcomeStatus.ACCEPT


async def test_a_broker_certificate_from_another_ca_is_refused_clearly(
    settings: Settings, tls_broker: TlsBroker
) -> None:
    wrong_ca = settings.model_copy(update={"amqp_url": tls_broker.url(ca="other-ca.pem")})
    with pytest.raises(ServiceError, match="certificate verify failed") as caught:
        await connect_broker(wrong_ca)
    assert "arbiter:***@" in str(caught.value)  # the URL is named, without its password


async def test_without_a_client_certificate_the_broker_refuses(
    settings: Settings, tls_broker: TlsBroker
) -> None:
    anonymous = settings.model_copy(update={"amqp_url": tls_broker.url(client_cert=False)})
    with pytest.raises(ServiceError, match="cannot reach RabbitMQ"):
        await connect_broker(anonymous)
