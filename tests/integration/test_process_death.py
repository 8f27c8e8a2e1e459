"""A process of a `--frontends 2` server dying under load (kill -9), on a real
`salience serve`:

- a front end: only the calls on its connections fail, with UNAVAILABLE; every
  other answer is right; the owner starts it again, and new connections are all
  served;
- the device owner (the `serve` process): the front ends' health Watch streams
  turn NOT_SERVING, every call in flight ends at once with UNAVAILABLE (none
  hangs until its deadline), new calls are UNAVAILABLE, and the front ends exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import predict_request
from tests.conftest import save_model
from tests.processes import ServerProcess, salience_serve

SHAPE = (4,)
CHANNELS = 8
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A connection of its own per channel (gRPC shares them between equal channels).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Calls carry a long deadline: one that hung would end DEADLINE_EXCEEDED, not UNAVAILABLE.
CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def model_and_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    import keras

    x = keras.Input(SHAPE, name="x")
    model = keras.Model(x, keras.layers.Dense(3, name="out")(x))
    return model, save_model(tmp_path_factory.mktemp("death-repo"), "tiny", model)


def frontends(server: ServerProcess) -> list[int]:
    """The pids of the server's front-end processes now."""
    pid = server.process.pid
    children = [  # any thread may have started them
        child
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    found = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"salience_server.procs.frontend" in command:
            found.append(int(child))
    return sorted(found)


def connections(pid: int, port: int) -> int:
    """Established client connections process `pid` holds on `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def until(condition: Any, what: str, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"not reached in {seconds:.0f} s: {what}"
        time.sleep(0.05)


def expected(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0), np.float32)


async def caller(
    stub: Any, model_out: dict[bytes, np.ndarray], stop: asyncio.Event, log: list[Any]
) -> None:
    """Predicts in a loop until `stop`, recording (code, right) per call."""
    rng = np.random.default_rng(len(log))
    inputs = [rng.normal(size=(1, *SHAPE)).astype(np.float32) for _ in range(4)]
    k = 0
    while not stop.is_set():
        x = inputs[k % len(inputs)]
        k += 1
        try:
            response = await stub.Predict(predict_request("tiny", x), timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError as err:
            log.append((err.code(), None))
            await asyncio.sleep(0.05)
            continue
        got = tensors.decode(response.outputs[0])
        log.append((grpc.StatusCode.OK, np.allclose(got, model_out[x.tobytes()], atol=1e-5)))


@pytest.fixture
def served(model_and_repo: tuple[Any, Path]) -> Iterator[ServerProcess]:
    _, repo = model_and_repo
    flags = ["--frontends", "2", "--shutdown-grace-seconds", "5"]
    with salience_serve(repo, flags, stop="kill") as server:
        until(lambda: len(frontends(server)) == 2, "two front ends")
        yield server


def test_a_killed_front_end_fails_only_its_calls_and_is_started_again(
    served: ServerProcess, model_and_repo: tuple[Any, Path]
) -> None:
    model, _ = model_and_repo
    port = int(served.target.rsplit(":", 1)[1])
    answers: dict[bytes, np.ndarray] = {}

    async def scenario() -> tuple[list[list[Any]], int, int]:
        channels = []
        # Channels until both front ends hold connections (the kernel spreads them).
        while True:
            channel = aio.insecure_channel(served.target, options=OWN_CONNECTION)
            await channel.channel_ready()
            channels.append(channel)
            pids = frontends(served)
            held = [connections(pid, port) for pid in pids]
            if len(channels) >= CHANNELS and all(held):
                break
            assert len(channels) < 64, held
        logs: list[list[Any]] = [[] for _ in channels]
        for log in logs:
            rng = np.random.default_rng(len(log))
            for x in [rng.normal(size=(1, *SHAPE)).astype(np.float32) for _ in range(4)]:
                answers[x.tobytes()] = expected(model, x)
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(caller(salience_pb2_grpc.SalienceStub(c), answers, stop, logs[k]))
            for k, c in enumerate(channels)
        ]
        await asyncio.sleep(1.0)
        victim = frontends(served)[0]
        victim_connections = connections(victim, port)
        os.kill(victim, signal.SIGKILL)
        await asyncio.to_thread(
            until,
            lambda: len(frontends(served)) == 2 and victim not in frontends(served),
            "the front end started again",
        )
        await asyncio.sleep(1.0)  # traffic goes on meanwhile
        stop.set()
        await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
        return logs, victim_connections, len(channels)

    logs, victim_connections, opened = asyncio.run(scenario())
    for log in logs:
        for code, right in log:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), code
            if code == grpc.StatusCode.OK:
                assert right
    failed = [log for log in logs if any(code != grpc.StatusCode.OK for code, _ in log)]
    # Only the killed front end's connections saw failures; the others never did.
    assert len(failed) <= victim_connections < opened
    assert "restarting it" in served.text()
    # Service continues: fresh connections are all answered, right.
    x = np.ones((1, *SHAPE), np.float32)
    for _ in range(6):
        with grpc.insecure_channel(served.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            got = tensors.decode(stub.Predict(predict_request("tiny", x), timeout=60).outputs[0])
            np.testing.assert_allclose(got, expected(model, x), atol=1e-5)


def test_a_killed_device_owner_turns_health_not_serving_and_fails_calls_promptly(
    served: ServerProcess, model_and_repo: tuple[Any, Path]
) -> None:
    model, _ = model_and_repo
    pids = frontends(served)

    async def scenario() -> tuple[list[list[Any]], list[Any], list[Any]]:
        channels = [
            aio.insecure_channel(served.target, options=OWN_CONNECTION) for _ in range(CHANNELS)
        ]
        for channel in channels:
            await channel.channel_ready()
        statuses: list[Any] = []

        async def watch(channel: Any) -> None:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    statuses.append(response.status)
            except aio.AioRpcError as err:
                statuses.append(err.code())

        watching = asyncio.create_task(watch(channels[0]))
        logs: list[list[Any]] = [[] for _ in channels]
        stop = asyncio.Event()
        answers: dict[bytes, np.ndarray] = {}
        rng = np.random.default_rng(0)
        for x in [rng.normal(size=(1, *SHAPE)).astype(np.float32) for _ in range(4)]:
            answers[x.tobytes()] = expected(model, x)
        tasks = [
            asyncio.create_task(caller(salience_pb2_grpc.SalienceStub(c), answers, stop, logs[k]))
            for k, c in enumerate(channels)
        ]
        await asyncio.sleep(1.0)
        served.process.kill()
        await asyncio.to_thread(served.process.wait, 60)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        after = []
        for channel in channels:
            try:
                stub = salience_pb2_grpc.SalienceStub(channel)
                x = np.ones((1, *SHAPE), np.float32)
                await stub.Predict(predict_request("tiny", x), timeout=CALL_TIMEOUT_S)
                after.append(grpc.StatusCode.OK)
            except aio.AioRpcError as err:
                after.append(err.code())
        await asyncio.wait_for(watching, 60)
        for channel in channels:
            await channel.close()
        return logs, after, statuses

    logs, after, statuses = asyncio.run(scenario())
    codes = [code for log in logs for code, _ in log]
    assert grpc.StatusCode.OK in codes  # it served before the kill
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert set(after) == {grpc.StatusCode.UNAVAILABLE}
    assert NOT_SERVING in statuses, statuses
    # The front ends do not outlive their owner for long.
    until(lambda: not any(alive(pid) for pid in pids), "front ends exited")


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
