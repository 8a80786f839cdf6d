"""deploy/rabbitmq/definitions.json, read offline: the topology is exactly what a worker would
declare, and each user's permission regexes grant what its role needs and nothing beside.
(tests/integration/test_least_privilege.py loads the file into a real broker.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from typing import Any

import pytest

from arbiter.worker.settings import Settings
from arbiter.worker.topology import proposals_queue_arguments
from tests.unit.deploy.paths import DEPLOY, hash_password_module

DEFINITIONS: dict[str, Any] = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
S = Settings()
VHOST = "arbiter"


def permission(user: str, kind: str) -> re.Pattern[str]:
    [entry] = [p for p in DEFINITIONS["permissions"] if p["user"] == user]
    assert entry["vhost"] == VHOST
    return re.compile(entry[kind])


def granted(user: str, kind: str, names: list[str]) -> set[str]:
    """The names ``user``'s ``kind`` regex matches (RabbitMQ searches, like re.search)."""
    pattern = permission(user, kind)
    return {name for name in names if pattern.search(name)}


# Reply queues: named by the server (amqplib, aio-pika's plain channels) or, by aio-pika's
# robust channels (ArbiterClient), client-side as amq_<uuid4 hex> so a reconnect keeps the name.
REPLY_QUEUES = {"amq.gen-Zlc4MS0A3L_i3FAONq7RNA", f"amq_{uuid.uuid4().hex}"}
NAMES = [
    S.proposals_exchange,  # also the proposals queue's name
    S.outcomes_exchange,
    S.dead_exchange,  # also the dead-letter queue's name
    S.events_exchange,
    S.task_runs_exchange,
    *REPLY_QUEUES,
    "executor-chosen-name",
    "amq_not-a-uuid",
]


def test_the_topology_is_what_a_worker_declares() -> None:
    exchanges = {(e["name"], e["type"], e["durable"]) for e in DEFINITIONS["exchanges"]}
    assert exchanges == {
        (S.proposals_exchange, "direct", True),
        (S.outcomes_exchange, "topic", True),
        (S.dead_exchange, "fanout", True),
        (S.events_exchange, "topic", True),
        (S.task_runs_exchange, "direct", True),
    }
    queues = {q["name"]: q for q in DEFINITIONS["queues"]}
    assert set(queues) == {S.proposals_queue, S.dead_queue}
    assert queues[S.proposals_queue]["arguments"] == proposals_queue_arguments(S)
    assert queues[S.dead_queue]["arguments"] == {"x-queue-type": "quorum"}
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in DEFINITIONS["bindings"]}
    assert bindings == {
        (S.proposals_exchange, S.proposals_queue, S.proposals_routing_key),
        (S.dead_exchange, S.dead_queue, ""),
    }


def test_everything_lives_in_the_arbiter_vhost() -> None:
    assert DEFINITIONS["vhosts"] == [{"name": VHOST}]
    for section in ("permissions", "topic_permissions", "policies", "exchanges", "queues"):
        assert {item["vhost"] for item in DEFINITIONS[section]} == {VHOST}, section
    assert {b["vhost"] for b in DEFINITIONS["bindings"]} == {VHOST}


def test_the_max_length_policy_caps_the_proposals_queue_alone() -> None:
    """The README's back-pressure cap: with x-overflow reject-publish, publishes past it
    are nacked rather than the backlog growing."""
    [policy] = DEFINITIONS["policies"]
    assert policy["apply-to"] == "queues"
    assert policy["definition"] == {"max-length": 100000}
    pattern = re.compile(policy["pattern"])
    assert pattern.search(S.proposals_queue)
    assert not pattern.search(S.dead_queue)
    assert not pattern.search(S.proposals_queue + "-copy")


def test_the_worker_consumes_proposals_publishes_the_rest_and_configures_nothing() -> None:
    assert granted("arbiter-worker", "configure", NAMES) == set()
    assert granted("arbiter-worker", "read", NAMES) == {S.proposals_queue}
    assert granted("arbiter-worker", "write", NAMES) == {
        S.outcomes_exchange,
        S.dead_exchange,
        S.events_exchange,
        S.task_runs_exchange,
    }


def test_an_executor_publishes_proposals_and_owns_only_generated_reply_queues() -> None:
    """configure+read+write on reply queues let it declare, bind and consume its own
    (exclusive: no other connection may touch it); read on the outcomes exchange lets it
    bind there; write on ``arbiter.proposals`` lets it publish (see the README for what that
    name, shared by the exchange and the queue, still allows)."""
    assert granted("arbiter-executor", "configure", NAMES) == REPLY_QUEUES
    assert granted("arbiter-executor", "write", NAMES) == {S.proposals_exchange, *REPLY_QUEUES}
    assert granted("arbiter-executor", "read", NAMES) == {S.outcomes_exchange, *REPLY_QUEUES}


def test_an_executor_may_bind_only_its_own_reply_key_on_the_outcomes_exchange() -> None:
    """Topic permissions check a binding's key against ``read``: the client's ``reply.<uuid>``
    passes; wildcards and the broadcast keys (other executors' outcomes) do not."""
    [topic] = DEFINITIONS["topic_permissions"]
    assert (topic["user"], topic["exchange"], topic["write"]) == (
        "arbiter-executor",
        S.outcomes_exchange,
        "^$",
    )
    read = re.compile(topic["read"])
    assert read.search(f"reply.{uuid.uuid4()}")
    for key in ("#", "reply.*", "reply.#", "outcome.flow_run.accept", "outcome.#", "reply."):
        assert not read.search(key), key


def test_the_monitor_may_only_look_queues_up() -> None:
    """KEDA's amqp scaler reads the depth by a passive declare, which needs no permission."""
    for kind in ("configure", "write", "read"):
        assert granted("arbiter-monitor", kind, NAMES) == set()


def test_only_the_admin_may_configure_the_topology_or_log_in_to_the_management_ui() -> None:
    for user in DEFINITIONS["users"]:
        configures = granted(user["name"], "configure", [S.proposals_queue, S.outcomes_exchange])
        is_admin = user["name"] == "arbiter-admin"
        assert bool(configures) is is_admin, user["name"]
        assert (user["tags"] == ["administrator"]) is is_admin, user["name"]


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("arbiter-admin", "arbiter-admin-dev"),
        ("arbiter-worker", "arbiter-worker-dev"),
        ("arbiter-executor", "arbiter-executor-dev"),
        ("arbiter-monitor", "arbiter-monitor-dev"),
    ],
)
def test_the_users_have_the_development_passwords_the_readme_names(
    user: str, password: str
) -> None:
    [entry] = [u for u in DEFINITIONS["users"] if u["name"] == user]
    assert entry["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert hash_password_module().verify(password, entry["password_hash"])
    assert not hash_password_module().verify(password + "x", entry["password_hash"])


def test_hash_password_makes_a_salted_hash_that_verifies() -> None:
    module = hash_password_module()
    first, second = module.hash_password("s3cret"), module.hash_password("s3cret")
    assert first != second  # salted
    assert module.verify("s3cret", first)
    assert module.verify("s3cret", second)
    assert not module.verify("s3creT", first)


def test_hash_password_script_reads_the_password_from_stdin() -> None:
    script = str(DEPLOY / "rabbitmq" / "hash_password.py")
    made = subprocess.run(
        [sys.executable, script], input="pw\n", capture_output=True, text=True, check=True
    )
    password_hash = made.stdout.strip()
    assert hash_password_module().verify("pw", password_hash)
    checks = [
        subprocess.run(
            [sys.executable, script, "--verify", password_hash],
            input=f"{password}\n",
            capture_output=True,
            text=True,
            check=False,
        )
        for password in ("pw", "other")
    ]
    assert [(c.returncode, c.stdout.strip()) for c in checks] == [
        (0, "matches"),
        (1, "does not match"),
    ]
