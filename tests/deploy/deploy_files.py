"""Reading the deployment files the way the tools that consume them do.

The Dockerfile as Docker parses it (comments dropped, continuation lines joined, one
instruction per logical line, numbered by build stage), `.dockerignore` with Docker's
matching rules, YAML documents, and the server settings that every `SALIENCE_*`
variable of a Dockerfile, compose file or manifest must name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from salience_server.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"

# Every variable the server reads: SALIENCE_ + a Settings field's name in capitals.
SETTINGS_VARIABLES = {ENV_PREFIX + f.name.upper(): f.name for f in dataclasses.fields(Settings)}
VARIABLE = re.compile(r"\bSALIENCE_[A-Z0-9_]+\b")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction; `stage` is -1 before the first FROM."""

    keyword: str
    arguments: str
    stage: int
    line: int

    def flags(self) -> dict[str, str]:
        """Leading `--name=value` options (COPY --from, HEALTHCHECK --interval, ...)."""
        found: dict[str, str] = {}
        for word in self.arguments.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def rest(self) -> str:
        """The arguments after the leading `--name=value` options."""
        words = self.arguments.split()
        while words and words[0].startswith("--"):
            words.pop(0)
        return " ".join(words)


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined as Docker joins them
    (the backslash and newline removed; comment lines inside an instruction dropped).
    """
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        # Comment lines and blank lines are dropped, inside a continued instruction too.
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        text = (pending + raw).strip()
        pending = ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage, start))
    assert not pending, f"{path} ends inside a continued line"
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK ... CMD)."""
    value = json.loads(arguments)
    assert isinstance(value, list), f"not an exec-form array: {arguments}"
    assert all(isinstance(word, str) for word in value), arguments
    return value


def stage_count(instructions: list[Instruction]) -> int:
    return max(i.stage for i in instructions) + 1


def args_defaults(instructions: list[Instruction], stage: int) -> dict[str, str]:
    """ARG defaults declared in a stage (-1: the global ones before the first FROM)."""
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and instruction.stage == stage:
            name, _, value = instruction.arguments.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (Go filepath.Match) pattern syntax, plus `**` for any number of folders."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("^", r"\^") + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` (relative, with slashes) out of the build context.

    As Docker does: the last pattern that matches the path or one of its parent
    folders decides, and a `!` pattern puts a path back.
    """
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        body = pattern[1:] if keep else pattern
        regex = _pattern_regex(body.strip().strip("/").removeprefix("./"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not keep
    return ignored


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML file, each a mapping."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"
    return documents


def unknown_variables(names: Iterable[str]) -> list[str]:
    """The `SALIENCE_*` names among `names` that no server setting reads."""
    return sorted({n for n in names if n.startswith(ENV_PREFIX)} - set(SETTINGS_VARIABLES))


def variables_in_text(path: Path) -> set[str]:
    """Every `SALIENCE_*` word of a file, comments included (a stale name in a comment
    misleads as much as one in a value).
    """
    return set(VARIABLE.findall(path.read_text()))
