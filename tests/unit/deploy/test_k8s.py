"""deploy/k8s, offline: every built-in kind valid by Kubernetes' own schemas (strict: an
unknown field fails, via kubernetes-validate), KEDA's kinds by their CRD's schema (vendored
in tests/schemas/keda), the kustomization listing exactly the files, and the pieces agreeing
with each other and with the worker's settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from arbiter.worker.settings import Settings
from tests.unit.deploy.paths import K8S, SCHEMAS

KUBERNETES_VERSION = "1.30"  # the oldest minor still supported by the major clouds
KEDA_KINDS = {
    "ScaledObject": "scaledobject.json",
    "TriggerAuthentication": "triggerauthentication.json",
}

Docs = dict[str, dict[str, Any]]  # kind -> document (one of each kind in the base)


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def base() -> Docs:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: Docs = {}
    for resource in kustomization["resources"]:
        for doc in load(K8S / resource):
            assert doc["kind"] not in docs, f"two {doc['kind']}s"
            docs[doc["kind"]] = doc
    return docs


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Kubernetes' schema for built-in kinds, the vendored CRD schema for KEDA's."""
    if doc["kind"] in KEDA_KINDS:
        schema = json.loads((SCHEMAS / "keda" / KEDA_KINDS[doc["kind"]]).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [error.message for error in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc).splitlines()[0]]
    return []


def container(docs: Docs, kind: str) -> dict[str, Any]:
    [only] = docs[kind]["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def secret_keys_used(pod_container: dict[str, Any]) -> dict[str, str]:
    """Variable -> Secret key, for the container's env entries read from the Secret."""
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]["key"]
        for env in pod_container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def wiring_problems(docs: Docs) -> list[str]:
    found: list[str] = []
    settings = docs["ConfigMap"]["data"]
    deployment, pod = docs["Deployment"], docs["Deployment"]["spec"]["template"]
    worker = container(docs, "Deployment")
    port = int(settings["ARBITER_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in worker.get("ports", [])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = worker.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or ports.get(get.get("port")) != port:
            found.append(f"the {probe} does not ask {path} on the metrics port {port}")
    requests = worker.get("resources", {}).get("requests", {})
    if not {"cpu", "memory"} <= set(requests):
        found.append("the worker requests no CPU or no memory")
    shutdown = float(settings.get("ARBITER_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= shutdown:
        found.append(f"terminationGracePeriodSeconds {grace} does not outlast the drain")
    if settings.get("ARBITER_DECLARE_TOPOLOGY") != "false":
        found.append("workers declare the topology: their user would need configure rights")
    selector = docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    if not selector.items() <= pod["metadata"]["labels"].items():
        found.append("the PodDisruptionBudget selects no worker pod")
    scaled = docs["ScaledObject"]["spec"]
    if scaled["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        found.append("the ScaledObject scales something else than the worker Deployment")
    [trigger] = scaled["triggers"]
    if (trigger["type"], trigger["metadata"].get("queueName")) != (
        "rabbitmq",
        Settings().proposals_queue,
    ):
        found.append("KEDA does not watch the proposals queue")
    if trigger["authenticationRef"]["name"] != docs["TriggerAuthentication"]["metadata"]["name"]:
        found.append("the trigger's authenticationRef names no TriggerAuthentication")
    secret = docs["Secret"]
    keys = set(secret["stringData"])
    wanted = {ref["key"] for ref in docs["TriggerAuthentication"]["spec"]["secretTargetRef"]}
    for kind in ("Deployment", "Job"):
        wanted |= set(secret_keys_used(container(docs, kind)).values())
    if not wanted <= keys:
        found.append(f"keys missing from the Secret: {sorted(wanted - keys)}")
    users = {key: urlsplit(url).username for key, url in secret["stringData"].items()}
    job_url = secret_keys_used(container(docs, "Job")).get("ARBITER_DATABASE_URL")
    if container(docs, "Job").get("args") != ["migrate"] or users.get(job_url) != "arbiter_owner":
        found.append("the Job does not run `arbiter migrate` as arbiter_owner")
    worker_keys = secret_keys_used(worker)
    if (
        users.get(worker_keys.get("ARBITER_AMQP_URL")),
        users.get(worker_keys.get("ARBITER_DATABASE_URL")),
    ) != ("arbiter-worker", "arbiter_worker"):
        found.append("the worker does not use the arbiter-worker user and arbiter_worker role")
    return found


def test_the_kustomization_lists_exactly_the_manifests_beside_it() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize(
    "path", sorted([*K8S.glob("*.yaml"), *K8S.glob("extras/*.yaml")]), ids=lambda p: p.name
)
def test_every_manifest_is_valid_by_its_schema(path: Path) -> None:
    for doc in load(path):
        if doc["kind"] != "Kustomization":
            assert schema_errors(doc) == [], doc["kind"]


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    [
        ("Deployment", ("spec", "template", "spec"), "terminationGracePeriodSecond"),
        ("PodDisruptionBudget", ("spec",), "maxUnavailible"),
        ("Job", ("spec",), "backofLimit"),
        ("ScaledObject", ("spec",), "maxReplicas"),
        ("ScaledObject", ("spec", "triggers", 0), "metdata"),
        ("TriggerAuthentication", ("spec",), "secretTargetRefs"),
    ],
)
def test_a_misspelt_field_fails_validation(
    kind: str, path: tuple[str | int, ...], field: str
) -> None:
    doc = copy.deepcopy(base()[kind])
    node: Any = doc
    for key in path:
        node = node[key]
    node[field] = 1
    assert any(field in error for error in schema_errors(doc))


def test_the_pieces_agree_with_each_other_and_the_settings() -> None:
    assert wiring_problems(base()) == []


def test_the_drain_default_is_what_the_grace_period_is_measured_against() -> None:
    """The ConfigMap states the timeout; were it dropped, the model's default applies."""
    assert float(base()["ConfigMap"]["data"]["ARBITER_SHUTDOWN_TIMEOUT_S"]) == (
        Settings.model_fields["shutdown_timeout_s"].default
    )


def _set(docs: Docs, kind: str, path: tuple[str | int, ...], value: object) -> None:
    node: Any = docs[kind]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


WORKER = ("spec", "template", "spec", "containers", 0)


@pytest.mark.parametrize(
    ("kind", "path", "value", "problem"),
    [
        ("Deployment", (*WORKER, "readinessProbe", "httpGet", "path"), "/livez", "/readyz"),
        ("Deployment", (*WORKER, "livenessProbe", "httpGet", "port"), 8080, "/livez"),
        ("ConfigMap", ("data", "ARBITER_METRICS_PORT"), "9200", "metrics port"),
        ("Deployment", (*WORKER, "resources"), {}, "requests no CPU"),
        ("Deployment", ("spec", "template", "spec", "terminationGracePeriodSeconds"), 30, "drain"),
        ("ConfigMap", ("data", "ARBITER_SHUTDOWN_TIMEOUT_S"), "60", "drain"),
        ("ConfigMap", ("data", "ARBITER_DECLARE_TOPOLOGY"), "true", "configure"),
        ("PodDisruptionBudget", ("spec", "selector", "matchLabels"), {"a": "b"}, "no worker"),
        ("ScaledObject", ("spec", "scaleTargetRef", "name"), "other", "something else"),
        ("ScaledObject", ("spec", "triggers", 0, "metadata", "queueName"), "x", "proposals"),
        ("TriggerAuthentication", ("metadata", "name"), "other", "authenticationRef"),
        ("Secret", ("stringData",), {}, "missing from the Secret"),
        ("Job", ("spec", "template", "spec", "containers", 0, "args"), ["worker"], "migrate"),
        (
            "Secret",
            ("stringData", "worker-amqp-url"),
            "amqp://arbiter-admin:x@rabbitmq/arbiter",
            "arbiter-worker",
        ),
    ],
)
def test_each_wiring_rule_catches_its_breach(
    kind: str, path: tuple[str | int, ...], value: object, problem: str
) -> None:
    docs = copy.deepcopy(base())
    _set(docs, kind, path, value)
    assert any(problem in found for found in wiring_problems(docs))
