"""A front-end process of `--frontends N`: the gRPC server (interceptor, auth,
servicers, streams, the Open Inference Protocol, health, reflection) over a
`RemoteCore` that forwards predict and explain to the device owner (`procs.owner`).
It never imports TensorFlow (tests/unit/server/test_no_tensorflow.py).

    python -m salience_server.procs.frontend RUN_DIRECTORY INDEX PORT

Started by the owner only. It stops when told (`stop`: NOT_SERVING, its calls
finish within the grace, then it exits), on SIGTERM (the same on its own), or when
the owner is gone: then every call fails at once with UNAVAILABLE, health turns
NOT_SERVING, and it exits after the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from salience_server import connections, errors, frontdoor
from salience_server.core import InferenceCore
from salience_server.errors import Call, ServiceError, Unavailable
from salience_server.explain import catalog
from salience_server.explain.options import ExplainOptions, ExplainResult
from salience_server.logs import install as install_limiter
from salience_server.metrics import Metrics
from salience_server.procs import wire
from salience_server.procs.state import RemoteModel, State, mirror, readiness
from salience_server.seam import ModelDevice
from salience_server.security import load_security
from salience_server.settings import Settings

log = logging.getLogger("salience_server.frontend")

OWNER_GONE = (
    "the server's device process stopped; this server cannot answer: retry on another "
    "server, or once it is restarted"
)


class RemoteFailure(Exception):
    """An unexpected failure on the device owner (logged there): INTERNAL here."""


class Owner:
    """The connection to the device owner: calls out, answers and state in."""

    def __init__(self, arena: wire.Arena, half: int) -> None:
        self.arena = arena
        self.allocator = wire.Allocator(half)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, tuple[asyncio.Future[Any], list[int]]] = {}
        self.models: dict[int, RemoteModel] = {}
        self.state: State | None = None
        self.lost = False
        self.stop_grace: float | None = None
        self._ids = itertools.count(1)

    def send(self, data: bytes) -> None:
        if not self.lost and self.writer is not None:
            self.writer.write(data)

    async def call(self, message: tuple[Any, ...]) -> tuple[RemoteModel, Any]:
        """Sends `(kind, <id>, *fields)` and awaits its answer."""
        if self.lost:
            raise Unavailable(OWNER_GONE)
        call_id = next(self._ids)
        data, blocks = await wire.pack(
            (message[0], call_id, *message[1:]), self.arena, 0, self.allocator
        )
        if self.lost:  # went while waiting for room
            for block in blocks:
                self.allocator.free(block)
            raise Unavailable(OWNER_GONE)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = (future, blocks)
        self.send(data)
        try:
            result: tuple[RemoteModel, Any] = await future
            return result
        except RemoteFailure:
            # As the interceptor answers an unexpected failure; the owner logged it.
            call = errors._CALL.get()
            rpc = call.rpc if call is not None else "the call"
            raise ServiceError(
                f"internal error while serving {rpc}; the server log has the details",
                grpc.StatusCode.INTERNAL,
            ) from None
        except asyncio.CancelledError:
            # The owner drops it (out of the queue, never computed) and says so; the
            # inputs' blocks are freed then, once it no longer reads them.
            if call_id in self.pending:
                self.send(wire.frame(("cancel", call_id)))
            raise

    def receive(self, data: bytes) -> str:
        """Takes one message from the owner; returns its kind."""
        message, blocks = wire.unpack(data, self.arena, 1, copy=True)
        if blocks:
            self.send(wire.frame(("free", blocks)))  # copied out: the owner may reuse them
        kind: str = message[0]
        if kind == "models":
            self.models.update(message[1])
            return kind
        if kind == "state":
            self.state = message[1]
            return kind
        if kind == "stop":
            self.stop_grace = float(message[1])
            return kind
        entry = self.pending.pop(message[1], None)
        if entry is None:
            return kind
        future, inputs = entry
        for block in inputs:
            self.allocator.free(block)
        if future.done():
            return kind
        if kind == "ok":
            future.set_result((self.models[message[2]], message[3]))
        elif kind == "error":
            _, _, name, code, text = message
            cls = getattr(errors, name, ServiceError)
            if not (isinstance(cls, type) and issubclass(cls, ServiceError)):
                cls = ServiceError
            future.set_exception(cls(text, grpc.StatusCode[code]))
        else:
            future.set_exception(RemoteFailure(message[2]))
            future.exception()  # retrieved: `call` turns it into INTERNAL
        return kind

    def lose(self) -> None:
        """The owner is gone: every call waiting for it fails with UNAVAILABLE."""
        self.lost = True
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(OWNER_GONE))
        self.pending.clear()


class ToOwner(logging.Handler):
    """Sends this process's log records to the owner, which logs them as its own:
    one log for the whole server (and one rate limit). Before the owner answers,
    and once it is gone, records go to stderr.
    """

    def __init__(self, owner: Owner, fallback: logging.Handler) -> None:
        super().__init__()
        self.owner = owner
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        if self.owner.lost or self.owner.writer is None or self.owner.state is None:
            self.fallback.handle(record)
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.owner.send(wire.frame(("log", record.name, record.levelno, message)))
        except Exception:
            self.handleError(record)


class RemoteCore(InferenceCore):
    """`InferenceCore`'s API over the device owner: requests are resolved, admitted,
    checked and computed there; readiness and the repository come from its state.
    """

    def __init__(self, settings: Settings, metrics: Metrics, owner: Owner) -> None:
        super().__init__(None, settings, metrics)
        self.owner = owner

    def apply(self, state: State) -> None:
        self.repository = mirror(state, self.owner.models)
        self.readiness = readiness(state)

    async def predict(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        deadline: float | None = None,
    ) -> tuple[ModelDevice, list[np.ndarray]]:
        return await self.owner.call(("predict", name, version, arrays, deadline))

    async def explain(
        self,
        name: str,
        version: int,
        arrays: dict[str, np.ndarray],
        options: ExplainOptions,
        deadline: float | None = None,
    ) -> tuple[ModelDevice, ExplainResult]:
        return await self.owner.call(("explain", name, version, arrays, options, deadline))

    def drain(self) -> None:
        """The owner's core drains (and refuses new requests) itself."""

    async def aclose(self) -> None:
        await asyncio.to_thread(self._host.shutdown, True)


class FrontEnd:
    def __init__(self, directory: Path, index: int, port: int) -> None:
        self.directory = directory
        self.index = index
        self.port = port
        with open(directory / "settings.pickle", "rb") as source:
            self.settings: Settings = pickle.load(source)
        self.metrics = Metrics(CollectorRegistry())
        half = max(wire.ARENA_MIN_BYTES, 2 * self.settings.max_message_bytes)
        path = directory / f"arena-{index}-{os.getpid()}"
        self.owner = Owner(wire.Arena(path, half, create=True), half)
        self.core = RemoteCore(self.settings, self.metrics, self.owner)
        self.server: aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self._told: dict[str, int] = {}
        self._shut = False
        self._working = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._grace = self.settings.shutdown_grace_seconds

    def _observe(self, call: Call) -> None:
        self.metrics.observe(call, self.core.repository.knows)
        self._working += -1 if call.done else 1
        if self._working:
            self._idle.clear()
        else:
            self._idle.set()

    def _serving(self) -> bool:
        # The server's health entry turns SERVING as the owner's `_serving` does.
        state = self.owner.state
        if state is None or state.stopping or self.owner.lost:
            return False
        return state.health.get("") == health_pb2.HealthCheckResponse.SERVING

    def _stopping(self) -> bool:
        state = self.owner.state
        return self.owner.lost or (state is not None and state.stopping)

    async def _follow(self, state: State) -> None:
        """Mirrors the owner's state: readiness, repository, health."""
        self.core.apply(state)
        for name in state.grad_modifiers:
            catalog.add_grad_modifier(name)
        assert self.health is not None
        for service, status in state.health.items():
            if self._told.get(service) != status:
                self._told[service] = status
                await self.health.set(service, status)
        if state.shut and not self._shut:
            self._shut = True
            await self.health.enter_graceful_shutdown()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Messages from the owner, until it is gone or says stop."""
        while (data := await wire.read_message(reader)) is not None:
            kind = self.owner.receive(data)
            if kind == "state" and self.owner.state is not None:
                await self._follow(self.owner.state)
            elif kind == "stop" and self.owner.stop_grace is not None:
                # Read on: the answers to the calls in flight are still to come.
                self._grace = self.owner.stop_grace
                self._stop.set()
        # The owner is gone.
        self.owner.lose()
        if not self._stop.is_set():
            log.error("front end %d: the device owner is gone; stopping", self.index)
            if self.health is not None and not self._shut:
                self._shut = True
                await self.health.enter_graceful_shutdown()
            self._stop.set()

    def _list_modules(self) -> None:
        """Writes the modules this process has imported (for the test that proves it
        never imports TensorFlow) to `modules-<pid>` in the run directory.
        """
        names = sorted({name.split(".")[0] for name in sys.modules} | set(sys.modules))
        path = self.directory / f"modules-{os.getpid()}"
        path.write_text("".join(f"{name}\n" for name in names) + ".\n")

    async def run(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.directory / "control"))
        self.owner.reader, self.owner.writer = reader, writer
        arena = self.owner.arena
        writer.write(wire.frame(("hello", self.index, os.getpid(), str(arena.path), arena.half)))
        # The owner's first word is the state (after the models it names).
        while self.owner.state is None:
            data = await wire.read_message(reader)
            if data is None:
                raise SystemExit("front end: the device owner closed the connection")
            self.owner.receive(data)
        security = await asyncio.to_thread(load_security, self.settings)
        _, fd_limit = connections.raise_fd_limit()
        cap = connections.connection_cap(self.settings, fd_limit)
        self.server, self.health = frontdoor.build_server(
            self.settings,
            security,
            self.core,
            self._observe,
            cap,
            self._serving,
            self._stopping,
            reuseport=True,
        )
        frontdoor.bind(self.server, self.settings, security, self.port)
        await self._follow(self.owner.state)
        await self.server.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR2, self._list_modules)
        reading = asyncio.create_task(self._read(reader), name="salience-frontend-read")
        writer.write(wire.frame(("listening",)))
        await self._stop.wait()
        # Calls in flight finish within the grace (new ones are refused by the
        # draining owner, or at once when it is gone); then the server stops.
        if not self._shut:
            self._shut = True
            await self.health.enter_graceful_shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self._grace)
        await self.server.stop(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        writer.close()
        await self.core.aclose()
        arena.close()
        with contextlib.suppress(OSError):
            arena.path.unlink()
        if self.owner.lost and self.owner.stop_grace is None:
            # The owner died without cleaning up: nobody else will (shared memory).
            shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    directory, index, port = Path(args[0]), int(args[1]), int(args[2])
    # The owner coordinates shutdown: a terminal's Ctrl-C reaches it, not this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    frontend = FrontEnd(directory, index, port)
    settings = frontend.settings
    stderr = logging.StreamHandler()
    stderr.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[front end {index}]: %(message)s")
    )
    logging.basicConfig(
        level=settings.log_level.upper(), handlers=[ToOwner(frontend.owner, stderr)]
    )
    limiter = install_limiter(settings.log_repeat_burst, settings.log_repeat_window_seconds)
    try:
        asyncio.run(frontend.run())
    finally:
        limiter.flush()


if __name__ == "__main__":
    main()
