"""deploy/compose.yaml: valid by the Compose Specification's JSON Schema (vendored in
tests/schemas), and wired as the README says: migrate once as the owner, then any number of
workers as the narrow users, with RabbitMQ's definitions and PostgreSQL's roles applied."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from arbiter.worker.settings import Settings
from tests.unit.deploy.paths import DEPLOY, ROOT, SCHEMAS, hash_password_module

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SCHEMA = json.loads((SCHEMAS / "compose-spec.json").read_text())


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    return [error.message for error in validator.iter_errors(document)]


def wiring_problems(doc: dict[str, Any]) -> list[str]:
    """What breaks the README's story, beyond what the schema can tell."""
    found: list[str] = []
    services = doc["services"]
    worker, migrate = services["worker"], services["migrate"]
    if "container_name" in worker or any(":" in str(p) for p in worker.get("ports", [])):
        found.append("the worker has a fixed name or host port: --scale cannot run several")
    if worker.get("command") != ["worker"] or migrate.get("command") != ["migrate"]:
        found.append("worker/migrate do not run `arbiter worker` / `arbiter migrate`")
    if worker["depends_on"].get("migrate", {}).get("condition") != (
        "service_completed_successfully"
    ):
        found.append("workers may start before the migration has finished")
    if worker["depends_on"].get("rabbitmq", {}).get("condition") != "service_healthy":
        found.append("workers may start before RabbitMQ has loaded its definitions")
    if migrate["depends_on"].get("postgres", {}).get("condition") != "service_healthy":
        found.append("the migration may start before PostgreSQL accepts connections")
    env = {k: interpolate(str(v)) for k, v in worker["environment"].items()}
    if env.get("ARBITER_DECLARE_TOPOLOGY") != "false":
        found.append("workers declare the topology: their user would need configure rights")
    grace = int(str(worker.get("stop_grace_period", "10s")).rstrip("s"))
    shutdown = float(env.get("ARBITER_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
    if grace <= shutdown:
        found.append(f"stop_grace_period {grace}s does not outlast the {shutdown:.0f} s drain")
    amqp = urlsplit(env["ARBITER_AMQP_URL"])
    if (amqp.username, amqp.path) != ("arbiter-worker", "/arbiter"):
        found.append("the worker does not log in as arbiter-worker on vhost arbiter")
    database = urlsplit(env["ARBITER_DATABASE_URL"])
    owner = urlsplit(interpolate(migrate["environment"]["ARBITER_DATABASE_URL"]))
    if database.username != "arbiter_worker" or owner.username != "arbiter_owner":
        found.append("the worker/migration do not use the arbiter_worker/arbiter_owner roles")
    pg_env = {k: interpolate(str(v)) for k, v in services["postgres"]["environment"].items()}
    if (database.password, owner.password) != (
        pg_env["ARBITER_PG_WORKER_PASSWORD"],
        pg_env["ARBITER_PG_OWNER_PASSWORD"],
    ):
        found.append("the URLs' passwords are not the ones PostgreSQL's roles are given")
    return found


def mounts(service: str) -> dict[str, str]:
    """Bind mounts of ``service``: target -> source (relative to deploy/)."""
    found = {}
    for volume in COMPOSE["services"][service]["volumes"]:
        source, target, *_ = interpolate(volume).split(":")
        if source.startswith("."):
            found[target] = source
    return found


def test_compose_file_is_valid_by_the_compose_specification() -> None:
    assert schema_errors(COMPOSE) == []


def test_a_misspelt_key_fails_the_schema() -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["worker"]["stop_grace_periods"] = "45s"
    assert any("stop_grace_periods" in error for error in schema_errors(broken))


def test_the_services_are_wired_as_the_readme_says() -> None:
    assert wiring_problems(COMPOSE) == []


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("worker", "container_name"), "arbiter-worker", "--scale"),
        (("worker", "ports"), ["9100:9100"], "--scale"),
        (("worker", "command"), ["migrate"], "`arbiter worker`"),
        (("worker", "depends_on", "migrate", "condition"), "service_started", "migration"),
        (("worker", "depends_on", "rabbitmq", "condition"), "service_started", "definitions"),
        (("migrate", "depends_on", "postgres", "condition"), "service_started", "PostgreSQL"),
        (("worker", "environment", "ARBITER_DECLARE_TOPOLOGY"), "true", "configure"),
        (("worker", "stop_grace_period"), "30s", "drain"),
        (
            ("worker", "environment", "ARBITER_AMQP_URL"),
            "amqp://arbiter-admin:x@rabbitmq:5672/arbiter",
            "arbiter-worker",
        ),
        (
            ("migrate", "environment", "ARBITER_DATABASE_URL"),
            "postgresql://arbiter_worker:arbiter-worker-dev@postgres:5432/arbiter",
            "arbiter_owner",
        ),
        (("postgres", "environment", "ARBITER_PG_WORKER_PASSWORD"), "other", "passwords"),
    ],
)
def test_each_wiring_rule_catches_its_breach(
    path: tuple[str, ...], value: object, problem: str
) -> None:
    broken = copy.deepcopy(COMPOSE)
    node = broken["services"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(problem in found for found in wiring_problems(broken))


def test_every_mounted_file_exists_and_the_definitions_are_where_rabbitmq_looks() -> None:
    for service in ("rabbitmq", "postgres"):
        for source in mounts(service).values():
            assert (DEPLOY / source).is_file(), source
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    path = re.search(r"^definitions\.local\.path = (\S+)$", conf, re.M)
    assert path is not None
    assert mounts("rabbitmq")[path.group(1)] == "./rabbitmq/definitions.json"
    assert "/etc/rabbitmq/conf.d/20-arbiter.conf" in mounts("rabbitmq")


def test_postgres_creates_the_roles_before_it_sets_their_passwords() -> None:
    """The image runs /docker-entrypoint-initdb.d in name order; a non-executable .sh would
    be sourced into its shell instead of run."""
    init = {t: s for t, s in mounts("postgres").items() if "/docker-entrypoint-initdb.d/" in t}
    assert [init[target] for target in sorted(init)] == [
        "./postgres/roles.sql",
        "./postgres/init-passwords.sh",
    ]
    assert os.access(DEPLOY / "postgres" / "init-passwords.sh", os.X_OK)


def test_the_workers_default_rabbitmq_password_matches_its_hash_in_the_definitions() -> None:
    env = COMPOSE["services"]["worker"]["environment"]
    password = urlsplit(interpolate(env["ARBITER_AMQP_URL"])).password
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    [user] = [u for u in definitions["users"] if u["name"] == "arbiter-worker"]
    assert hash_password_module().verify(password, user["password_hash"])


def test_the_image_is_built_from_the_repository_root_with_deploy_dockerfile() -> None:
    for service in ("migrate", "worker"):
        build = COMPOSE["services"][service]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
