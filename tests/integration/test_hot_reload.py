"""Hot reload on a real server, under traffic: a new version takes over and its
removal hands back to the one below, a corrupt version is reported and never
replaces the served one, a changed config.toml rebuilds a model's versions, model
directories come and go, and a request in flight during a swap finishes on the
version it started on. No request fails at any point.

Every model here answers its version number whatever the input (a Dense layer with
zero kernel and bias = version), so each response shows which runtime computed it.
The server polls every 0.1 s; the tests wait for each change by polling metadata,
with a generous bound that only stops a hung test.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from salience.v1 import salience_pb2 as pb
from salience_client import SalienceClient, SalienceError
from salience_client.cli.models import format_models
from tests.conftest import RunningServer, running_server

X = np.ones((1, 2), np.float32)
POLL = {"repository_poll_seconds": 0.1, "max_device_batch_size": 2}
READY = pb.VERSION_STATE_READY
FAILED = pb.VERSION_STATE_FAILED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved models by version, copied into repositories as the tests need them."""
    import keras

    root = tmp_path_factory.mktemp("hot-reload-models")
    for version in (1, 2, 3):
        x = keras.Input((2,), name="x")
        out = keras.layers.Dense(
            1,
            kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(float(version)),
            name="out",
        )(x)
        keras.Model(x, out).save(root / f"v{version}.keras")
    return root


def put_version(staging: Path, repo: Path, model: str, version: int, source: int) -> None:
    """Copies model `source` in as `model/version`, atomically: built beside the
    repository, then renamed into place (as the README advises).
    """
    building = repo.parent / f"building-{model}-{version}"
    building.mkdir()
    shutil.copy(staging / f"v{source}.keras", building / "model.keras")
    building.rename(repo / model / str(version))


def put_garbage(repo: Path, model: str, version: int) -> None:
    building = repo.parent / f"building-{model}-{version}"
    building.mkdir()
    (building / "model.keras").write_bytes(b"this is not a zip archive")
    building.rename(repo / model / str(version))


def new_repo(tmp_path: Path, staging: Path, models: dict[str, list[int]]) -> Path:
    repo = tmp_path / "repo"
    for model, versions in models.items():
        (repo / model).mkdir(parents=True)
        for version in versions:
            put_version(staging, repo, model, version, version)
    return repo


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 60.0) -> None:
    """Polls `condition` until it holds; the bound only stops a hung test."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def states(client: SalienceClient, model: str = "m") -> list[tuple[int, int]]:
    return [(s.version, s.state) for s in client.metadata(model).version_status]


def batcher_tasks_left(running: RunningServer) -> int:
    """Batching tasks running beyond those of the served versions' batchers: a
    retired version's batcher must be closed, never left behind.
    """

    async def count() -> int:
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("batcher-")]
        return len(tasks) - len(running.server.core.batchers)

    result: int = running.call(count())
    return result


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


class Traffic:
    """Requests for model `m` (version 0, the highest) sent back to back from two
    threads, alternating predictions and explanations, until stopped. Each thread
    records the versions that answered, in order; any failure is recorded.
    """

    def __init__(self, target: str, threads: int = 2) -> None:
        self.target = target
        self.versions: list[list[int]] = [[] for _ in range(threads)]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, args=(k,), daemon=True) for k in range(threads)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _send(self, k: int) -> None:
        with SalienceClient(self.target, timeout=60) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    if n % 2:
                        answer: Any = client.predict("m", X)
                    else:
                        answer = client.explain("m", X, method="vanilla")
                except SalienceError as err:
                    self.failures.append(str(err))
                    continue
                value = float(next(iter(answer.outputs.values()))[0, 0])
                if value != answer.model_version:
                    self.failures.append(f"version {answer.model_version} answered {value}")
                self.versions[k].append(answer.model_version)

    def count(self, version: int) -> int:
        return sum(seen.count(version) for seen in self.versions)

    def last(self) -> set[int | None]:
        """The version each thread heard from last (None: nothing yet)."""
        return {seen[-1] if seen else None for seen in self.versions}

    def runs(self) -> list[list[int]]:
        """Per thread, the versions in the order they took over (repeats dropped)."""
        return [
            [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v] for seen in self.versions
        ]


@pytest.fixture
def client_of() -> Iterator[Callable[[RunningServer], SalienceClient]]:
    opened: list[SalienceClient] = []

    def make(running: RunningServer) -> SalienceClient:
        opened.append(running.client(timeout=30))
        return opened[-1]

    yield make
    for client in opened:
        client.close()


def test_a_new_version_takes_over_and_its_removal_hands_back(
    tmp_path: Path, staging: Path, client_of: Callable[[RunningServer], SalienceClient]
) -> None:
    repo = new_repo(tmp_path, staging, {"m": [1]})
    with running_server(repo, **POLL) as running, Traffic(running.target) as traffic:
        client = client_of(running)
        wait_for("traffic on version 1", lambda: traffic.count(1) >= 10)

        put_version(staging, repo, "m", 2, 2)
        wait_for("version 2 served", lambda: client.metadata("m").versions == [2])
        wait_for("every thread on version 2", lambda: traffic.last() == {2})
        wait_for("version 1 unloaded", lambda: states(client) == [(2, READY)])
        switched = traffic.count(2)
        wait_for("more traffic on version 2", lambda: traffic.count(2) >= switched + 10)

        shutil.rmtree(repo / "m" / "2")
        # latest 1 serves version 1 again: it is loaded afresh, then takes over.
        wait_for("version 1 served", lambda: client.metadata("m").versions == [1])
        wait_for("every thread on version 1", lambda: traffic.last() == {1})
        wait_for("version 2 unloaded", lambda: states(client) == [(1, READY)])
        back = traffic.count(1)
        wait_for("more traffic on version 1", lambda: traffic.count(1) >= back + 10)

        with pytest.raises(SalienceError) as gone:
            client.predict("m", X, version=2)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        assert gone.value.details == (
            "model.version=2 of model 'm' is not served: choose one of 1 (or 0 for the highest)"
        )
        assert batcher_tasks_left(running) <= 0
    assert traffic.failures == []
    # Each thread saw 1, then 2, then 1: a swap never mixes versions back and forth.
    assert traffic.runs() == [[1, 2, 1], [1, 2, 1]]


def test_a_corrupt_version_is_reported_and_the_served_one_keeps_serving(
    tmp_path: Path, staging: Path, client_of: Callable[[RunningServer], SalienceClient]
) -> None:
    repo = new_repo(tmp_path, staging, {"m": [1, 2]})
    with running_server(repo, **POLL) as running, Traffic(running.target) as traffic:
        client = client_of(running)
        assert client.metadata("m").versions == [2]  # latest 1
        wait_for("traffic on version 2", lambda: traffic.count(2) >= 10)

        put_garbage(repo, "m", 3)
        wait_for("version 3 reported", lambda: (3, FAILED) in states(client))
        metadata = client.metadata("m")
        assert metadata.versions == [2]
        assert states(client) == [(2, READY), (3, FAILED)]
        reason = metadata.version_status[1].reason
        # Keras's own words, naming the file.
        assert reason.startswith("ValueError: "), reason
        assert "m/3/model.keras" in reason  # relative to the repository
        assert str(repo) not in reason
        assert "zip file" in reason
        (listed,) = client.list_models()
        assert [(s.version, s.state) for s in listed.version_status] == [(2, READY), (3, FAILED)]
        assert f"  version 3: failed: {reason}" in format_models([listed])
        before = traffic.count(2)
        wait_for("more traffic on version 2", lambda: traffic.count(2) >= before + 10)
        assert traffic.last() == {2}

        # Fixed files are tried again, and then take over.
        shutil.rmtree(repo / "m" / "3")
        put_version(staging, repo, "m", 3, 3)
        wait_for("version 3 served", lambda: states(client) == [(3, READY)])
        wait_for("every thread on version 3", lambda: traffic.last() == {3})
        wait_for("version 2 unloaded", lambda: batcher_tasks_left(running) <= 0)
    assert traffic.failures == []
    assert traffic.runs() == [[2, 3], [2, 3]]


def test_configuration_changes_and_models_that_come_and_go(
    tmp_path: Path, staging: Path, client_of: Callable[[RunningServer], SalienceClient]
) -> None:
    repo = new_repo(tmp_path, staging, {"m": [1, 2]})
    with running_server(repo, **POLL) as running, Traffic(running.target) as traffic:
        client = client_of(running)
        assert client.predict("m", X).labels == []

        # A new configuration rebuilds every version with it.
        (repo / "m" / "config.toml").write_text('version_policy = "all"\nlabels = ["value"]\n')
        wait_for("both versions served", lambda: client.metadata("m").versions == [1, 2])
        wait_for("the old version 2 unloaded", lambda: states(client) == [(1, READY), (2, READY)])
        assert client.predict("m", X, version=2).labels == ["value"]
        assert client.predict("m", X, version=1).labels == ["value"]

        # A broken one is reported, and what is served stays.
        (repo / "m" / "config.toml").write_text('version_policy = "sometimes"\n')
        wait_for("the configuration reported", lambda: (0, FAILED) in states(client))
        metadata = client.metadata("m")
        assert metadata.versions == [1, 2]
        assert metadata.version_status[0].reason.startswith("config.toml: version_policy=")
        assert client.predict("m", X, version=2).labels == ["value"]

        # A new model directory is loaded and gets its health entry ...
        (repo / "n").mkdir()
        put_version(staging, repo, "n", 1, 3)
        wait_for(
            "model n served",
            lambda: (
                [(m.name, list(m.versions)) for m in client.list_models()]
                == [("m", [1, 2]), ("n", [1])]
            ),
        )
        assert client.predict("n", X).outputs["out"].tolist() == [[3.0]]
        assert health(running.target, "n") == SERVING

        # ... and a removed one stops.
        shutil.rmtree(repo / "n")
        wait_for("model n gone", lambda: [m.name for m in client.list_models()] == ["m"])
        with pytest.raises(SalienceError) as gone:
            client.predict("n", X)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        assert gone.value.details == "model.name='n' is not served: choose one of 'm'"
        assert health(running.target, "n") == NOT_SERVING
        wait_for("model n unloaded", lambda: batcher_tasks_left(running) <= 0)
    assert traffic.failures == []
    assert {v for seen in traffic.versions for v in seen} == {2}


def test_a_model_that_fails_entirely_is_listed_with_its_reason(
    tmp_path: Path, staging: Path, client_of: Callable[[RunningServer], SalienceClient]
) -> None:
    repo = new_repo(tmp_path, staging, {"m": [1]})
    (repo / "bad").mkdir()
    put_garbage(repo, "bad", 1)
    with running_server(repo, **POLL) as running:
        client = client_of(running)
        listed = {m.name: m for m in client.list_models()}
        assert sorted(listed) == ["bad", "m"]
        assert list(listed["m"].versions) == [1]
        bad = listed["bad"]
        assert list(bad.versions) == []
        (status,) = bad.version_status
        assert (status.version, status.state) == (1, FAILED)
        # Named relative to the repository: clients never learn the server's paths.
        assert "bad/1/model.keras" in status.reason
        assert str(repo) not in status.reason
        lines = format_models([bad])
        assert lines[0] == "bad  not served"
        assert lines[1] == f"  version 1: failed: {status.reason}"
        with pytest.raises(SalienceError) as caught:
            client.predict("bad", X)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_a_request_in_flight_during_a_swap_finishes_on_its_version(
    tmp_path: Path, staging: Path, client_of: Callable[[RunningServer], SalienceClient]
) -> None:
    # Requests wait for batch company for a minute: one is held in version 1's queue
    # while version 2 replaces it, and let go only by the swap.
    repo = new_repo(tmp_path, staging, {"m": [1]})
    with running_server(repo, max_queue_delay_ms=60_000, **POLL) as running:
        client = client_of(running)
        answers: dict[str, Any] = {}

        def send(label: str) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: answers.__setitem__(label, client.predict("m", X)), daemon=True
            )
            thread.start()
            return thread

        def queued(version: int) -> int:
            async def count() -> int:
                batcher = running.server.core.batchers.get(("m", version))
                return 0 if batcher is None else batcher.queued

            result: int = running.call(count())
            return result

        held = send("held")
        wait_for("the request queued on version 1", lambda: queued(1) == 1)
        put_version(staging, repo, "m", 2, 2)
        held.join(60)
        assert answers["held"].model_version == 1
        assert answers["held"].outputs["out"].tolist() == [[1.0]]
        assert client.metadata("m").versions == [2]

        after = send("after")
        wait_for("the next request queued on version 2", lambda: queued(2) == 1)

        async def flush() -> None:
            running.server.core.batchers[("m", 2)].flush()

        running.call(flush())
        after.join(60)
        assert answers["after"].model_version == 2
        assert answers["after"].outputs["out"].tolist() == [[2.0]]
