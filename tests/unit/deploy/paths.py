"""Where the deployment files are, and the project metadata the tests compare them with."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = ROOT / "tests" / "schemas"


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dev_packages() -> set[str]:
    """The distribution names in pyproject's dev extra (without version bounds)."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return {
        requirement.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for requirement in project["optional-dependencies"]["dev"]
    }


def hash_password_module() -> ModuleType:
    """deploy/rabbitmq/hash_password.py, a stdlib-only script outside the packages."""
    path = DEPLOY / "rabbitmq" / "hash_password.py"
    spec = importlib.util.spec_from_file_location("arbiter_hash_password", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
