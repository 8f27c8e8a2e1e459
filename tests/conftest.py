"""Shared fixtures: a real salience server on 127.0.0.1:0 and tiny Keras models.

The server runs its asyncio loop on a thread of its own, so tests call it with the
ordinary blocking client exactly as a user would.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The device every test server computes on unless a test names one: `auto` (the
# first GPU if any, else the CPU), `cpu` or `gpu`. scripts/gpu-check sets `gpu`, so
# that a GPU TensorFlow cannot see fails start-up instead of running on the CPU.
TEST_DEVICES = ("auto", "cpu", "gpu")
TEST_DEVICE = os.environ.get("SALIENCE_TEST_DEVICE", "auto").strip().lower()
# Front-end processes of every test server (`--frontends`): 1, the single-process
# server; 2 or more, TensorFlow-free front ends over a device owner (the test
# process). `make test` runs a subset of tests/integration with 2 as well.
TEST_FRONTENDS = int(os.environ.get("SALIENCE_TEST_FRONTENDS", "1"))
if TEST_DEVICE not in TEST_DEVICES:
    raise RuntimeError(
        f"SALIENCE_TEST_DEVICE={TEST_DEVICE!r} is not allowed: use {', '.join(TEST_DEVICES)}"
    )


@dataclass
class RunningServer:
    """A server started by `running_server`; `target` is what clients dial."""

    server: Any
    loop: asyncio.AbstractEventLoop
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> Any:
        from salience_client import SalienceClient

        return SalienceClient(self.target, **kwargs)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Runs a coroutine on the server's loop (to reach its internals) and waits."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def batchers(self, model: str | None = None) -> list[Any]:
        """The batchers the server made so far (of one model's versions, if named)."""

        async def get() -> list[Any]:
            items = self.server.core.batchers.items()
            return [b for (name, _), b in items if model is None or name == model]

        result: list[Any] = self.call(get())
        return result

    def queued(self, model: str | None = None) -> int:
        """Samples waiting in the batchers' queues (of one model, if named)."""

        async def count() -> int:
            items = self.server.core.batchers.items()
            return sum(b.queued for (name, _), b in items if model is None or name == model)

        result: int = self.call(count())
        return result

    def flush(self) -> None:
        """Sends what every batcher holds to the device now."""

        async def go() -> None:
            for b in self.server.core.batchers.values():
                b.flush()

        self.call(go())


@contextmanager
def running_server(
    repository: Path | None, *, wait_ready: bool = True, **settings: Any
) -> Iterator[RunningServer]:
    """Starts a real server on a free port in a background thread; stops it after.

    With `wait_ready` (the default) it yields once the models are loaded and warmed
    up (health SERVING), so no test races the start-up.
    """
    from prometheus_client import CollectorRegistry

    from salience_server.app import SalienceServer
    from salience_server.settings import Settings

    values = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "device": TEST_DEVICE,
        "frontends": TEST_FRONTENDS,
    }
    values.update(settings)
    if repository is not None:
        values["model_repository"] = repository
    server = SalienceServer(Settings(**values), registry=CollectorRegistry())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(300)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        raise
    try:
        if wait_ready:
            asyncio.run_coroutine_threadsafe(server.wait_ready(), loop).result(300)
        yield RunningServer(server, loop, port)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def save_model(root: Path, name: str, model: Any, version: int = 1) -> Path:
    """Saves a Keras model into the repository layout; returns the repository root."""
    target = root / name / str(version)
    target.mkdir(parents=True, exist_ok=True)
    model.save(target / "model.keras")
    return root


@pytest.fixture(scope="module")
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Starts servers (one per call) that live until the test module that started them
    ends: a module's servers never hold memory and threads through the rest of the run.
    """
    stack: list[Any] = []

    def start(repository: Path | None, **settings: Any) -> RunningServer:
        context = running_server(repository, **settings)
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def demo_server() -> Iterator[RunningServer]:
    """One server on the bundled demo models, shared by every module that only calls
    them (nothing reads its counters), so the suite loads and warms them up once.
    """
    with running_server(None) as running:
        yield running
