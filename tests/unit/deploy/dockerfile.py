"""A Dockerfile read into instructions, and what ours must be, as a list of problems."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, USER...
    arguments: str  # continuation lines joined


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse(text: str) -> list[Stage]:
    """Instructions grouped by stage. Comments go; a trailing backslash continues a line."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(instruction: Instruction | None) -> list[str] | None:
    """The JSON array of an exec-form instruction (HEALTHCHECK: of its CMD); None if shell form."""
    if instruction is None:
        return None
    arguments = instruction.arguments
    if instruction.keyword == "HEALTHCHECK":
        arguments = arguments.partition("CMD ")[2]
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def problems(text: str, *, dev_packages: set[str]) -> list[str]:
    """What keeps ``text`` from being the image the README promises (empty: nothing)."""
    stages = parse(text)
    found: list[str] = []
    if len(stages) < 2:
        return ["not multi-stage: one FROM"]
    final = stages[-1]
    if not all(re.search(r"-slim\b|-slim-", stage.base) for stage in stages):
        found.append("a stage's base image is not a slim one")
    builders = {stage.name for stage in stages[:-1] if stage.name}
    copied_from = {
        word.split("=", 1)[1]
        for copy in final.all("COPY")
        for word in copy.arguments.split()
        if word.startswith("--from=")
    }
    if not copied_from & builders:
        found.append("the final stage copies nothing from a build stage")
    user = final.last("USER")
    if user is None:
        found.append("the final stage runs as root: no USER")
    else:
        name = user.arguments.split(":")[0]
        if name in ("root", "0"):
            found.append(f"USER {user.arguments} is root")
        later = final.instructions[final.instructions.index(user) + 1 :]
        if any(i.keyword == "RUN" for i in later) or final.all("USER")[0] is not user:
            found.append("USER is not the last word on who runs: a RUN or USER follows it")
    for stage in stages:
        for run in stage.all("RUN"):
            for install in re.findall(r"pip install([^&;|]*)", run.arguments):
                words = set(re.findall(r"[A-Za-z0-9_.-]+", install))
                if re.search(r"\[[^\]]*\bdev\b", install) or words & dev_packages:
                    found.append(f"a RUN installs dev dependencies: pip install{install}")
    if exec_form(final.last("ENTRYPOINT")) != ["arbiter"]:
        found.append("ENTRYPOINT is not the exec form ['arbiter']")
    healthcheck = final.last("HEALTHCHECK")
    command = exec_form(healthcheck)
    if healthcheck is None or command is None:
        found.append("no HEALTHCHECK in exec form")
    elif not any("/livez" in word or "/healthz" in word for word in command):
        found.append("the HEALTHCHECK does not ask the liveness endpoint")
    return found
