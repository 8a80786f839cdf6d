"""deploy/Dockerfile, read without Docker: multi-stage on slim bases, runtime dependencies
only, a non-root user, ``arbiter`` as the entry point and a liveness HEALTHCHECK. (Building
it needs a Docker engine: tests/system/test_image.py.)"""

from __future__ import annotations

import re

import pytest

from tests.unit.deploy.dockerfile import exec_form, parse, problems
from tests.unit.deploy.paths import DEPLOY, ROOT, dev_packages, pyproject

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def test_the_dockerfile_meets_every_rule() -> None:
    assert problems(DOCKERFILE, dev_packages=dev_packages()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: re.sub(r"(?m)^FROM .* AS build\n(.|\n)*?(?=^FROM )", "", t), "not multi-stage"),
        (lambda t: t.replace("slim-bookworm AS runtime", "bookworm AS runtime"), "slim"),
        (lambda t: t.replace("COPY --from=build", "COPY"), "copies nothing"),
        (lambda t: t.replace("USER 10001:10001", "USER root"), "is root"),
        (lambda t: re.sub(r"(?m)^USER .*\n", "", t), "no USER"),
        (lambda t: t.replace("EXPOSE 9100", "USER 0\nEXPOSE 9100"), "is root"),
        (lambda t: t.replace("EXPOSE 9100", "RUN apt-get update\nEXPOSE 9100"), "a RUN"),
        (lambda t: t.replace("pip install .", "pip install '.[dev]'"), "dev dependencies"),
        (lambda t: t.replace("pip install .", "pip install . pytest"), "dev dependencies"),
        (lambda t: t.replace('ENTRYPOINT ["arbiter"]', "ENTRYPOINT arbiter"), "ENTRYPOINT"),
        (lambda t: t.replace('ENTRYPOINT ["arbiter"]', 'ENTRYPOINT ["python"]'), "ENTRYPOINT"),
        (lambda t: t.replace("/livez", "/metrics"), "liveness"),
        (lambda t: re.sub(r"(?ms)^HEALTHCHECK .*?\n(?=ENTRYPOINT)", "", t), "HEALTHCHECK"),
    ],
)
def test_each_rule_catches_its_breach(change: object, problem: str) -> None:
    """Every check above can fail: a Dockerfile broken in one way shows that one problem."""
    assert callable(change)
    broken = change(DOCKERFILE)
    assert broken != DOCKERFILE
    assert any(problem in found for found in problems(broken, dev_packages=dev_packages()))


def test_the_build_stage_copies_every_package_and_dockerignore_lets_them_through() -> None:
    """A package added to pyproject but not copied would be missing from the image."""
    tool = pyproject()["tool"]
    assert isinstance(tool, dict)
    setuptools = tool["setuptools"]
    mapped: dict[str, str] = setuptools["package-dir"]

    def folder(package: str) -> str:
        """The top-level folder a package's files come from (package-dir maps some)."""
        prefixes = [p for p in mapped if package == p or package.startswith(p + ".")]
        return mapped[max(prefixes, key=len)] if prefixes else package.split(".")[0]

    top_levels = {folder(package).split("/")[0] for package in setuptools["packages"]}
    build = parse(DOCKERFILE)[0]
    copied = {copy.arguments.split()[0] for copy in build.all("COPY")}
    assert top_levels | {"pyproject.toml"} == copied
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == copied


def test_the_healthcheck_asks_the_port_the_image_exposes() -> None:
    final = parse(DOCKERFILE)[-1]
    env = " ".join(i.arguments for i in final.all("ENV"))
    port = re.search(r"ARBITER_METRICS_PORT=(\d+)", env)
    assert port is not None
    assert [i.arguments for i in final.all("EXPOSE")] == [port.group(1)]
    command = exec_form(final.last("HEALTHCHECK"))
    assert command is not None
    assert f"'{port.group(1)}'" in command[-1]  # the default when the variable is unset
    assert exec_form(final.last("CMD")) == ["worker"]
