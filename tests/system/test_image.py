"""The image's install, without Docker: exactly the files deploy/Dockerfile copies, installed
as it installs them (``pip install .``) into a fresh venv, give a working ``arbiter`` and no
dev dependency. With a Docker engine, the image itself is built and run too."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
import venv
from pathlib import Path

import pytest

from devtools.devservices import docker_available
from tests.unit.deploy.dockerfile import parse
from tests.unit.deploy.paths import DEPLOY, ROOT, dev_packages, pyproject

pytestmark = pytest.mark.system

DOCKERFILE = DEPLOY / "Dockerfile"


def run(*command: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def build_context(target: Path) -> Path:
    """What the build stage COPYs, copied into ``target``: nothing else reaches pip."""
    [build, *_] = parse(DOCKERFILE.read_text())
    target.mkdir()
    for copy in build.all("COPY"):
        source = copy.arguments.split()[0]
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, target / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / source, target / source)
    return target


@pytest.mark.timeout(300)
def test_the_images_install_gives_a_working_entry_point_and_no_dev_dependency(
    tmp_path: Path,
) -> None:
    context = build_context(tmp_path / "src")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    installed = run(
        python, "-m", "pip", "install", "--disable-pip-version-check", "-q", context, timeout=240
    )
    assert installed.returncode == 0, installed.stderr
    helped = run(env / "bin" / "arbiter", "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("worker", "migrate", "runs", "proposals", "limits"):
        assert command in helped.stdout
    listed = run(python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check")
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert names & dev_packages() == set()
    project = pyproject()["project"]
    assert isinstance(project, dict)
    runtime = {
        dependency.split(">")[0].split("[")[0].lower().replace("_", "-")
        for dependency in project["dependencies"]
    }
    assert runtime <= {name.replace("_", "-") for name in names}


@pytest.mark.skipif(not docker_available(), reason="no Docker engine answers (README: Skips)")
@pytest.mark.timeout(900)
def test_the_image_builds_runs_arbiter_as_a_non_root_user_and_checks_liveness() -> None:
    tag = f"arbiter-test:{uuid.uuid4().hex[:8]}"
    built = run("docker", "build", "-f", DOCKERFILE, "-t", tag, ROOT, timeout=840)
    assert built.returncode == 0, built.stderr
    try:
        helped = run("docker", "run", "--rm", tag, "--help")
        assert helped.returncode == 0, helped.stderr
        assert "migrate" in helped.stdout
        whoami = run("docker", "run", "--rm", "--entrypoint", "id", tag, "-u")
        assert whoami.stdout.strip() == "10001"
        inspected = run(
            "docker", "image", "inspect", tag, "--format", "{{json .Config.Healthcheck}}"
        )
        assert "/livez" in inspected.stdout
        pips = run("docker", "run", "--rm", "--entrypoint", "python", tag, "-m", "pip", "--version")
        assert pips.returncode != 0  # pip itself was removed from the runtime venv
    finally:
        run("docker", "image", "rm", "--force", tag)
