"""The image, built and run for real (marker `image`: `make image-test`).

One container of the image built from this checkout, run as the compose file runs the
`salience` service — its lockdown (read-only root, tmpfs /tmp, every capability
dropped, no-new-privileges), its environment and stop grace — on free ports of
127.0.0.1, and one native `salience serve` of the same tree beside it:

- the HEALTHCHECK reports healthy, and from inside the container the server (PID 1)
  runs as 10001:10001 with no capability, no-new-privileges and a read-only root;
- from the host, ListModels, Predict and every explanation method on every bundled
  model answer as the native server does (values within 1e-5, errors identical);
- `docker stop` while calls are in flight: every call finishes OK, and the server exits
  0 (not killed) within the grace.

Figures (build time, size, largest layers, time to healthy, drain time) are printed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from google.protobuf import json_format

import salience_server
from salience_client.client import SalienceClient, SalienceError
from salience_server.explain.options import METHOD_NAMES
from tests.deploy.conftest import BuiltImage
from tests.deploy.deploy_files import COMPOSE
from tests.deploy.engine import Engine, free_ports, wait_healthy
from tests.deploy.observability import duration_seconds
from tests.processes import ServerProcess, salience_serve

pytestmark = pytest.mark.image

DEMO_MODELS = Path(salience_server.__file__).parent / "demo" / "models"
TOLERANCE = 1e-5
# Calls kept in flight while the container is stopped: SmoothGrad on a batch of 4,
# heavy enough to outlast the moment the stop is sent, light enough to finish within
# the server's grace on 2 cores.
IN_FLIGHT = 4
SAMPLES = 32


def compose_service() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["salience"]
    return service


def lockdown_flags() -> list[str]:
    """`docker run` flags for the compose service's lockdown, environment and stop
    grace, read from the compose file so the two cannot drift apart.
    """
    service = compose_service()
    assert service["read_only"] is True
    flags = ["--read-only"]
    flags += [f for path in service["tmpfs"] for f in ("--tmpfs", path)]
    flags += [f for cap in service["cap_drop"] for f in ("--cap-drop", cap)]
    flags += [f for option in service["security_opt"] for f in ("--security-opt", option)]
    flags += [f for k, v in service["environment"].items() for f in ("--env", f"{k}={v}")]
    flags += ["--stop-timeout", str(int(stop_grace_seconds()))]
    return flags


def stop_grace_seconds() -> float:
    return duration_seconds(compose_service()["stop_grace_period"])


@dataclass
class Servers:
    engine: Engine
    container: str
    target: str
    metrics_url: str
    native: ServerProcess
    healthy_seconds: float


@pytest.fixture(scope="module")
def servers(engine: Engine, image: BuiltImage) -> Iterator[Servers]:
    grpc_port, metrics_port = free_ports(2)
    name = f"salience-image-test-{os.getpid()}"
    engine.docker("network", "create", name)
    try:
        engine.docker(
            "run", "--detach", "--name", name, "--network", name,
            "--publish", f"127.0.0.1:{grpc_port}:50051",
            "--publish", f"127.0.0.1:{metrics_port}:8000",
            *lockdown_flags(), image.name,
        )  # fmt: skip
        # The native server loads while the container does.
        with salience_serve(DEMO_MODELS, stop="term") as native:
            healthy = wait_healthy(engine, name)
            print(f"\nimage: healthy {healthy:.1f} s after the container started")
            yield Servers(
                engine,
                name,
                f"127.0.0.1:{grpc_port}",
                f"http://127.0.0.1:{metrics_port}/metrics",
                native,
                healthy,
            )
    finally:
        engine.docker("rm", "--force", name, check=False)
        engine.docker("network", "rm", name, check=False)


# What the server (PID 1) and a process started beside it see of their confinement.
PROBE = r"""
import errno, json, os
status = dict(line.split(":", 1) for line in open("/proc/1/status").read().splitlines())
status = {k: v.strip() for k, v in status.items()}
mounts = {m.split()[1]: m.split() for m in open("/proc/1/mounts").read().splitlines()}
def write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return "written"
    except OSError as err:
        return errno.errorcode[err.errno]
print(json.dumps({
    "uid": status["Uid"].split(), "gid": status["Gid"].split(),
    "caps": {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "no_new_privs": status["NoNewPrivs"],
    "root": mounts["/"][3].split(","), "tmp": mounts["/tmp"][2],
    "write_root": write("/probe"), "write_venv": write("/opt/salience/probe"),
    "write_tmp": write("/tmp/probe"), "me": [os.getuid(), os.getgid()],
}))
"""


def test_it_runs_healthy_locked_down_and_non_root(servers: Servers) -> None:
    result = servers.engine.docker("exec", servers.container, "python", "-c", PROBE)
    seen = json.loads(result.stdout)
    # Real, effective, saved and file-system ids of the server.
    assert seen["uid"] == ["10001"] * 4
    assert seen["gid"] == ["10001"] * 4
    assert seen["me"] == [10001, 10001]
    capabilities = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    assert seen["caps"] == dict.fromkeys(capabilities, "0" * 16)
    assert seen["no_new_privs"] == "1"
    assert "ro" in seen["root"]
    assert seen["write_root"] == seen["write_venv"] == "EROFS"
    assert seen["tmp"] == "tmpfs"
    assert seen["write_tmp"] == "written"
    (state,) = (c["State"] for c in servers.engine.inspect(servers.container))
    assert state["Health"]["Status"] == "healthy"
    assert state["Health"]["Log"][-1]["Output"].strip() == (
        "health of the server at 127.0.0.1:50051: SERVING"
    )


def metadata_dicts(client: SalienceClient) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(m) for m in client.list_models()]


def outcome(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A call's result, or its error's code and message: both servers must agree on
    either.
    """
    try:
        return call(*args, **kwargs)
    except SalienceError as err:
        return ("error", err.code, err.details)


def assert_close(container: Any, native: Any, what: str) -> None:
    if isinstance(native, tuple):
        assert container == native, what
        return
    assert container.outputs.keys() == native.outputs.keys(), what
    for key, value in native.outputs.items():
        np.testing.assert_allclose(container.outputs[key], value, atol=TOLERANCE, err_msg=what)
    assert container.labels == native.labels, what
    native_maps = getattr(native, "maps", None)
    if native_maps is not None:
        assert container.maps.keys() == native_maps.keys(), what
        for key, value in native_maps.items():
            np.testing.assert_allclose(container.maps[key], value, atol=TOLERANCE, err_msg=what)


def demo_inputs(metadata: dict[str, Any], seed: int) -> np.ndarray:
    (spec,) = metadata["inputs"]
    shape = [int(d) if int(d) > 0 else 2 for d in spec["shape"]]
    shape[0] = 2  # the batch
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_it_answers_as_a_native_server_of_the_same_tree(servers: Servers) -> None:
    with (
        SalienceClient(servers.target) as container,
        SalienceClient(servers.native.target) as native,
    ):
        models = metadata_dicts(native)
        assert metadata_dicts(container) == models
        assert sorted(m["name"] for m in models) == ["shapes", "shapes-spurious", "steering"]
        compared = 0
        for seed, metadata in enumerate(models):
            name = metadata["name"]
            images = demo_inputs(metadata, seed)
            assert_close(
                outcome(container.predict, name, images),
                outcome(native.predict, name, images),
                f"{name} predict",
            )
            for method in METHOD_NAMES:
                options = {"method": method, "seed": 7, "grad_modifiers": ["absolute", "negate"]}
                theirs = outcome(container.explain, name, images, **options)
                ours = outcome(native.explain, name, images, **options)
                assert_close(theirs, ours, f"{name} {method}")
                compared += not isinstance(ours, tuple)
        # Most methods apply to every demo model; an error must be the rare case.
        assert compared >= 2 * len(models) * len(METHOD_NAMES) // 3


def in_flight(metrics_url: str, rpc: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    line = f'salience_requests_in_flight{{rpc="{rpc}"}} '
    values = [float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)]
    return values[0] if values else 0.0


def test_docker_stop_drains_calls_in_flight_and_exits_0(servers: Servers) -> None:
    # Runs last in this module: it stops the container.
    images = np.random.default_rng(1).random((4, 64, 64, 3), dtype=np.float32)
    results: list[Any] = [None] * IN_FLIGHT
    finished = [0.0] * IN_FLIGHT

    def call(i: int) -> None:
        with SalienceClient(servers.target, retry=None) as client:
            results[i] = outcome(
                client.explain,
                "shapes",
                images,
                method="smoothgrad",
                samples=SAMPLES,
                seed=i,
                timeout=120,
            )
        finished[i] = time.monotonic()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 60
    while in_flight(servers.metrics_url, "Explain") < IN_FLIGHT:
        assert time.monotonic() < end, "the calls never were all in flight"
        time.sleep(0.05)
    start = time.monotonic()
    servers.engine.docker("stop", servers.container, timeout=stop_grace_seconds() + 60)
    drain = time.monotonic() - start
    for thread in threads:
        thread.join(120)
    failed = [r for r in results if r is None or isinstance(r, tuple)]
    assert failed == [], failed
    assert all(r.maps["absolute"].shape == (4, 64, 64) for r in results)
    (state,) = (c["State"] for c in servers.engine.inspect(servers.container))
    # 0, not 137: the server ended by itself, before Docker's SIGKILL at the grace.
    assert (state["ExitCode"], state["OOMKilled"], state["Running"]) == (0, False, False)
    logs = servers.engine.docker("logs", servers.container).stderr
    assert logs.rstrip().endswith("stopped"), logs[-2000:]
    grace = compose_service()["environment"]["SALIENCE_SHUTDOWN_GRACE_SECONDS"]
    print(
        f"\nimage: docker stop with {IN_FLIGHT} Explain calls in flight: all OK, exit 0, "
        f"{drain:.1f} s, the last call answered {max(finished) - start:.1f} s after the stop "
        f"(server grace {grace} s, SIGKILL at {stop_grace_seconds():.0f} s)"
    )
