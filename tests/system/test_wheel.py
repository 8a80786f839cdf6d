"""The wheel as a user gets it: built from the source folders, installed into a fresh venv,
it adds one import name (``arbiter``) to site-packages, ships the console script, the
migrations and the JSON Schemas, leaves the dev-only code out, and works from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.deploy.paths import ROOT

pytestmark = [pytest.mark.system, pytest.mark.integration]

SOURCES = ("pyproject.toml", "arbiter", "worker", "rules", "schemas")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    env: Path
    elsewhere: Path  # a working directory with no checkout in it

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"

    def run(
        self, *command: str | Path, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("ARBITER_", "PYTHON"))}
        return subprocess.run(
            [str(part) for part in command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.elsewhere,
            env={**clean, **(env or {})},
        )


def checked(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from a copy of the source folders (nothing else of the checkout), and
    a fresh venv with it and its runtime dependencies installed."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    built = base / "dist"
    checked(
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", built, source],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    )
    [wheel] = built.glob("arbiter-*.whl")
    env = base / "venv"
    venv.create(env, with_pip=True)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    result = Installed(wheel, env, elsewhere)
    checked(
        result.run(
            result.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel,
            timeout=300,
        )
    )  # fmt: skip
    return result


def test_the_wheel_holds_one_top_level_package_and_no_dev_only_code(
    installed: Installed,
) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"arbiter", "arbiter-0.1.0.dist-info"}
    assert {name.split("/")[1] for name in names if name.startswith("arbiter/")} >= {
        "worker",
        "rules",
        "schemas",
    }
    for dev_only in ("devtools", "devservices", "devcontainers", "loadgen", "pool.py", "tests"):
        assert not [name for name in names if dev_only in name.split("/")], dev_only
    shipped = set(names)
    assert "arbiter/py.typed" in shipped
    assert "arbiter/worker/db/migrations/script.py.mako" in shipped
    migrations = [n for n in names if n.startswith("arbiter/worker/db/migrations/versions/")]
    in_checkout = list((ROOT / "worker/db/migrations/versions").glob("*.py"))
    assert len(migrations) == len(in_checkout)
    schemas = {n for n in names if n.startswith("arbiter/schemas/jsonschema/")}
    assert schemas == {
        f"arbiter/schemas/jsonschema/{p.name}" for p in (ROOT / "schemas/jsonschema").glob("*")
    }


def test_the_installed_command_answers_help_from_any_directory(installed: Installed) -> None:
    helped = checked(installed.run(installed.env / "bin" / "arbiter", "--help"))
    for command in ("worker", "migrate", "runs", "limits", "deployments"):
        assert command in helped
    assert "migrate" in checked(installed.run(installed.python, "-m", "arbiter", "--help"))


def test_the_public_api_imports_and_no_generic_top_level_name_is_installed(
    installed: Installed,
) -> None:
    probe = """
import importlib.util, json, pathlib
from arbiter.worker.client import ArbiterClient
from arbiter.schemas import Proposal, ProposedState, Outcome, FlowRunSpec, TaskRunSpec, StateType
from arbiter.rules.engine import Orchestrator, default_policies
from arbiter.rules.memory import InMemoryStore
import arbiter
print(json.dumps({
    "arbiter": arbiter.__file__,
    "generic": [n for n in ("worker", "rules", "schemas", "devtools")
                if importlib.util.find_spec(n) is not None],
    "client": ArbiterClient.__module__,
    "policies": default_policies().task.__name__,
    "schema": Proposal.model_json_schema()["title"],
}))
"""
    found = json.loads(checked(installed.run(installed.python, "-c", probe)))
    assert Path(found["arbiter"]).is_relative_to(installed.env)
    assert found["generic"] == []
    assert found["client"] == "arbiter.worker.client"
    assert found["policies"] == "CoreTaskPolicy"
    assert found["schema"] == "Proposal"


def test_the_installed_migrate_builds_the_schema_on_an_empty_database(
    installed: Installed, empty_database_url: str
) -> None:
    env = {"ARBITER_DATABASE_URL": empty_database_url}
    arbiter = installed.env / "bin" / "arbiter"
    checked(installed.run(arbiter, "migrate", env=env))
    checked(installed.run(arbiter, "migrate", env=env))  # idempotent
    listed = json.loads(checked(installed.run(arbiter, "limits", "ls", "--json", env=env)))
    assert listed == []
