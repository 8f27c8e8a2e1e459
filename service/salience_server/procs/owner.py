"""The device owner's side of `--frontends N` (N >= 2): this process keeps the model
repository, the core, the batchers and hot reload, and starts N front-end processes
(`procs.frontend`) that serve the gRPC port over it.

    clients ─┬─> front end 1 ─┐  control: Unix socket   ┌─ InferenceCore, batchers,
             ├─> front end 2 ─┼─ tensors: shared memory ─┤  models (TensorFlow),
             └─> front end N ─┘  (`wire`)                └─ hot reload: this process

The port: a plain bind first proves it free (a held port is refused with the
usual BindError); then this process holds a bound, never listening, SO_REUSEPORT
socket on it for the server's life, which reserves it (and turns port 0 into a
number) and takes no connections; the front ends bind it with SO_REUSEPORT and
the kernel spreads connections over them.

Front ends learn the models (descriptors: `RemoteModel`), their readiness, the
repository's version states and health from `State` messages, pushed whenever
they change. A request is resolved, admitted, checked and computed here, exactly
as in one process; its errors go back as (class, status code, message).

Supervision: a front end that exits is started again (its calls in flight fail
with UNAVAILABLE, as a dropped connection does). `stop` drains: the core refuses
new requests, each front end goes NOT_SERVING and finishes its calls within the
grace, and only then are the models released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.registry import Collector

from salience_server.errors import ResourceExhausted, ServiceError
from salience_server.explain import catalog
from salience_server.frontdoor import BindError
from salience_server.procs import wire
from salience_server.procs.state import RemoteModel, State, describe
from salience_server.security import Security

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from salience_server.app import SalienceServer
    from salience_server.seam import ModelDevice

log = logging.getLogger(__name__)

# How often the state is compared with what the front ends were last told.
PUSH_SECONDS = 0.05
# A front end that does not listen this long after starting failed to start.
START_TIMEOUT_SECONDS = 120.0
# Restarts of a front end that keeps exiting are spaced by at least this much.
RESTART_SECONDS = 0.5


def run_directory() -> Path:
    """A private directory for the control socket, the arenas and the front ends'
    metric files: in /dev/shm (memory) where there is one.
    """
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="salience-", dir=base))


class MirroredHealth(health.aio.HealthServicer):
    """The owner's health statuses, served by no server of its own: the front ends
    serve copies (`State.health`). Every change wakes the push.
    """

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, int] = {}
        self.shut = False
        self.changed: Callable[[], None] = lambda: None

    async def set(self, service: str, status: Any) -> None:
        if not self.shut:  # as the servicer: after shutdown began, nothing changes
            self.statuses[service] = int(status)
        await super().set(service, status)
        self.changed()

    async def enter_graceful_shutdown(self) -> None:
        self.shut = True
        for service in self.statuses:
            self.statuses[service] = int(health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()
        self.changed()


class FrontEndMetrics(Collector):
    """The front ends' metrics (prometheus_client's multiprocess files, summed over
    the processes), registered with the owner's: a test or a scrape that reads the
    owner's registry finds the RPC series the front ends count.
    """

    def __init__(self, directory: Path) -> None:
        self.files = multiprocess.MultiProcessCollector(None, str(directory))
        self.frozen: list[Metric] | None = None

    def freeze(self) -> None:
        """The front ends are gone and their files are about to be: what they counted
        stays readable in the owner's registry, as one process's counts do after stop.
        """
        self.frozen = list(self.files.collect())

    def collect(self) -> Iterator[Metric]:
        return iter(self.frozen if self.frozen is not None else self.files.collect())


class MergedCollector(Collector):
    """The owner's registry with one family per name: the owner's own families of
    RPC metrics are empty (the front ends count RPCs) and the front ends' have no
    device series, so merging by name gives one coherent exposition.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for family in self.registry.collect():
            found = families.get(family.name)
            if found is None:
                families[family.name] = family
            else:
                found.samples.extend(family.samples)
        yield from families.values()


@dataclass(eq=False)
class Link:
    """One front end's connection: its arena, and the requests it has here."""

    index: int
    pid: int
    arena: wire.Arena
    allocator: wire.Allocator
    writer: asyncio.StreamWriter
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)  # model descriptors it has
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)


class FrontEnds:
    """Starts, feeds, supervises and stops the front-end processes of `server`."""

    def __init__(self, server: SalienceServer, security: Security, cap: int) -> None:
        self.server = server
        self.settings = server.settings
        self.security = security
        self.count = server.settings.frontends
        self.directory = run_directory()
        self.socket_path = self.directory / "control"
        self.metrics_dir = self.directory / "metrics"
        self.metrics_dir.mkdir()
        self.port = 0
        self._reservation: socket.socket | None = None
        self._control: asyncio.AbstractServer | None = None
        self._links: dict[int, Link] = {}
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._push: asyncio.Task[None] | None = None
        self._stopping = False
        self._serials: weakref.WeakKeyDictionary[Any, RemoteModel] = weakref.WeakKeyDictionary()
        self._next_serial = 1
        self._state: State | None = None
        self._listening: dict[int, asyncio.Event] = {}
        # The front ends' RPC metrics join this process's, on its /metrics too.
        self._metrics = FrontEndMetrics(self.metrics_dir)
        server.metrics.registry.register(self._metrics)
        exposed = CollectorRegistry()
        exposed.register(MergedCollector(server.metrics.registry))
        server.metrics.exposed = exposed
        # Readiness changes reach the front ends at once (the rest within PUSH_SECONDS).
        core = server.core
        assert core is not None
        for method in ("attach", "set_ready", "set_failed", "fail_loading", "forget", "expect"):
            setattr(core, method, self._pushing_after(getattr(core, method)))

    def _pushing_after(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if self._state is not None and not self._stopping:
                self.push()
            return result

        return call

    # Start -------------------------------------------------------------------

    def _reserve(self) -> int:
        """Proves the port free with a plain bind, then holds it (SO_REUSEPORT, never
        listening) for the front ends; returns its number.
        """
        host, port = self.settings.host, self.settings.port
        address = f"{host}:{port}"
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as err:
            raise BindError("gRPC", address, "port", str(err)) from None
        family, _, _, _, sockaddr = info[0]
        reservation = socket.socket(family, socket.SOCK_STREAM)
        try:
            if port:
                # A socket listening there (ours or anyone's) refuses this plain bind.
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(sockaddr)
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reservation.bind(sockaddr)
        except OSError as err:
            reservation.close()
            reason = err.strerror or str(err)
            if err.errno == errno.EADDRINUSE:
                reason = "address already in use"
            raise BindError("gRPC", address, "port", reason) from None
        self._reservation = reservation
        return int(reservation.getsockname()[1])

    async def start(self) -> int:
        """Starts the front ends; returns the port once every one listens on it."""
        self.port = self._reserve()
        (self.directory / "settings.pickle").write_bytes(pickle.dumps(self.settings))
        self._control = await asyncio.start_unix_server(self._connected, str(self.socket_path))
        self._state = self._snapshot()
        for index in range(self.count):
            self._listening[index] = asyncio.Event()
            self._supervisors.append(
                asyncio.create_task(self._supervise(index), name=f"salience-frontend-{index}")
            )
        try:
            end = time.monotonic() + START_TIMEOUT_SECONDS
            while not all(e.is_set() for e in self._listening.values()):
                failed = [t for t in self._supervisors if t.done()]
                if failed or time.monotonic() > end:
                    raise RuntimeError(
                        "the front-end processes did not start (their log lines above say why)"
                    )
                await asyncio.sleep(0.02)
        except BaseException:
            await self.stop(0)
            raise
        self._push = asyncio.create_task(self._pushing(), name="salience-frontend-push")
        log.info("%d front-end processes serve port %d", self.count, self.port)
        return self.port

    def _command(self, index: int) -> list[str]:
        return [
            sys.executable, "-m", "salience_server.procs.frontend",
            str(self.directory), str(index), str(self.port),
        ]  # fmt: skip

    async def _supervise(self, index: int) -> None:
        """Runs front end `index`, and starts it again whenever it exits (until stop)."""
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        first = True
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            # Popen and a thread that waits: asyncio's child watchers need the main
            # thread's loop, and the server may run on another.
            process = await asyncio.to_thread(
                subprocess.Popen, self._command(index), env=env, stdin=subprocess.DEVNULL
            )
            self._processes[index] = process
            code = await asyncio.to_thread(process.wait)
            multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
            if self._stopping:
                return
            if first and not self._listening[index].is_set():
                raise RuntimeError(f"front end {index} exited with status {code} at start-up")
            first = False
            log.warning(
                "front end %d (pid %d) exited with status %d: restarting it",
                index,
                process.pid,
                code,
            )
            spent = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, RESTART_SECONDS - spent))

    # State -------------------------------------------------------------------

    def _descriptor(self, runtime: ModelDevice) -> RemoteModel:
        found = self._serials.get(runtime)
        if found is None:
            found = self._serials[runtime] = describe(runtime, self._next_serial)
            self._next_serial += 1
        return found

    def _snapshot(self) -> State:
        server, core = self.server, self.server.core
        assert core is not None
        repository = core.repository
        models: dict[str, dict[int, int]] = {}
        for name in repository.names():
            models[name] = {
                v: self._descriptor(r).serial for v, r in repository.runtimes(name).items()
            }
        health_servicer = server._health
        statuses = health_servicer.statuses if isinstance(health_servicer, MirroredHealth) else {}
        states, reasons = core.readiness.snapshot()
        return State(
            models=models,
            failures=repository.failures,
            loading=frozenset(repository._loading),
            unloading=tuple((r.name, r.version) for r in repository._unloading),
            states=states,
            reasons=reasons,
            health=dict(statuses),
            shut=isinstance(health_servicer, MirroredHealth) and health_servicer.shut,
            serving=server._serving,
            stopping=server._stopping,
            grad_modifiers=catalog.grad_modifiers(),
        )

    def _models_for(self, link: Link, serials: Iterator[int] | list[int]) -> dict[int, RemoteModel]:
        by_serial = {d.serial: d for d in self._serials.values()}
        new = {s: by_serial[s] for s in serials if s not in link.sent and s in by_serial}
        link.sent.update(new)
        return new

    def _tell(self, link: Link, state: State) -> None:
        serials = [s for versions in state.models.values() for s in versions.values()]
        new = self._models_for(link, serials)
        if new:
            link.send(wire.frame(("models", new)))
        link.send(wire.frame(("state", state)))

    def push(self) -> None:
        """Tells every front end the state, if it changed since last told."""
        state = self._snapshot()
        if state == self._state:
            return
        self._state = state
        for link in self._links.values():
            self._tell(link, state)

    async def _pushing(self) -> None:
        """Health changes are pushed as they happen; the rest is looked at this often."""
        health_servicer = self.server._health
        assert isinstance(health_servicer, MirroredHealth)
        health_servicer.changed = self.push
        while True:
            await asyncio.sleep(PUSH_SECONDS)
            self.push()

    # Requests ----------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link: Link | None = None
        try:
            data = await wire.read_message(reader)
            if data is None:
                return
            _, index, pid, path, half = wire.loads(data)
            arena = wire.Arena(Path(path), half, create=False)
            link = Link(index, pid, arena, wire.Allocator(half), writer)
            old = self._links.get(index)
            if old is not None:
                self._close(old)
            self._links[index] = link
            state = self._state = self._snapshot()
            self._tell(link, state)
            while (data := await wire.read_message(reader)) is not None:
                self._receive(link, data)
        finally:
            if link is not None:
                self._close(link)
                if self._links.get(link.index) is link:
                    del self._links[link.index]
            writer.close()

    def _close(self, link: Link) -> None:
        """A front end gone: its requests are cancelled (none reaches the device)."""
        link.closed = True
        for task in link.tasks.values():
            task.cancel()
        link.tasks.clear()
        link.arena.close()
        with contextlib.suppress(OSError):
            link.arena.path.unlink()

    def _receive(self, link: Link, data: bytes) -> None:
        message, _ = wire.unpack(data, link.arena, 0, copy=False)
        kind = message[0]
        if kind == "predict" or kind == "explain":
            call_id = message[1]
            task = asyncio.create_task(self._serve(link, message))
            link.tasks[call_id] = task
        elif kind == "cancel":
            running = link.tasks.get(message[1])
            if running is not None:
                running.cancel()
        elif kind == "free":
            for block in message[1]:
                link.allocator.free(block)
        elif kind == "log":
            _, name, level, text = message
            logging.getLogger(name).log(level, "%s", text)
        elif kind == "listening":
            self._listening[link.index].set()

    async def _serve(self, link: Link, message: tuple[Any, ...]) -> None:
        kind, call_id, name, version, arrays = message[:5]
        core = self.server.core
        assert core is not None
        try:
            try:
                result: Any
                if kind == "predict":
                    runtime, result = await core.predict(name, version, arrays, message[5])
                else:
                    runtime, result = await core.explain(
                        name, version, arrays, message[5], message[6]
                    )
                serial = self._descriptor(runtime).serial
                new = self._models_for(link, [serial])
                if new:
                    link.send(wire.frame(("models", new)))
                data, _ = await wire.pack(
                    ("ok", call_id, serial, result), link.arena, 1, link.allocator
                )
            except wire.ArenaFull as err:
                raise ResourceExhausted(
                    f"the answer holds too many tensors to pass between processes ({err})"
                ) from None
            link.send(data)
        except ServiceError as err:
            link.send(
                wire.frame(("error", call_id, type(err).__name__, err.code.name, err.message))
            )
        except asyncio.CancelledError:
            # The front end cancelled it (or is gone): it only needs to know it is over.
            link.send(wire.frame(("error", call_id, "ServiceError", "CANCELLED", "cancelled")))
        except Exception as err:
            # Logged here, with the traceback; the front end answers INTERNAL without it.
            log.exception("unexpected failure in %s (for front end %d)", kind, link.index)
            link.send(wire.frame(("internal", call_id, f"{type(err).__name__}: {err}")))
        finally:
            link.tasks.pop(call_id, None)

    # Stop --------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Each front end stops taking calls, finishes those in flight within `grace`
        and exits; then the port and the run directory are released.
        """
        self._stopping = True
        log.debug("stopping the front ends (grace %.1fs)", grace)
        if self._push is not None:
            self._push.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._push
        if self.server.core is not None:
            self.push()  # the front ends see `stopping` before they are told to stop
        for link in self._links.values():
            link.send(wire.frame(("stop", grace)))
        log.debug("told %d front ends to stop", len(self._links))
        processes = list(self._processes.values())
        waits = [asyncio.to_thread(p.wait, grace + 10.0) for p in processes]
        await asyncio.gather(*waits, return_exceptions=True)  # TimeoutExpired: killed
        for process in processes:
            if process.poll() is None:
                process.kill()
                await asyncio.to_thread(process.wait)
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        if self._control is not None:
            self._control.close()
        for link in list(self._links.values()):
            self._close(link)
        self._links.clear()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        self._metrics.freeze()
        shutil.rmtree(self.directory, ignore_errors=True)
