"""Server wiring: health, reflection, Prometheus exposition, ordered shutdown."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from salience_client import SalienceError
from tests.conftest import running_server
from tests.integration.models import LINEAR_SHAPE, build_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("server-repo"))


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_reports_serving_for_the_server_and_the_service(
    repo: Path, server_factory: Any
) -> None:
    running = server_factory(repo)
    assert health_status(running.target) == health_pb2.HealthCheckResponse.SERVING
    assert (
        health_status(running.target, "salience.v1.Salience")
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_reflection_lists_the_services(repo: Path, server_factory: Any) -> None:
    running = server_factory(repo)
    with grpc.insecure_channel(running.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"salience.v1.Salience", "grpc.health.v1.Health"} <= names


def test_metrics_are_exposed_in_prometheus_format(repo: Path) -> None:
    with running_server(repo, metrics_port=0) as running, running.client() as client:
        x = np.zeros((3, *LINEAR_SHAPE), np.float32)
        client.explain("linear", x, filter_indices=[0])
        client.predict("linear", x[:1])
        with pytest.raises(SalienceError):
            client.predict("missing", x)
        port = running.server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    assert (
        'salience_requests_total{code="OK",method="vanilla",model="linear",rpc="Explain"} 1.0'
        in text
    )
    assert (
        'salience_requests_total{code="NOT_FOUND",method="predict",model="",rpc="Predict"} 1.0'
        in text
    )
    assert 'salience_samples_total{kind="explain",model="linear"} 3.0' in text
    assert (
        'salience_request_duration_seconds_count{method="predict",model="linear",rpc="Predict"} 1.0'
        in text
    )
    assert 'salience_compute_duration_seconds_count{kind="predict",model="linear"} 1.0' in text


def test_shutdown_lets_in_flight_calls_finish_then_refuses_new_ones(repo: Path) -> None:
    context = running_server(repo)
    running = context.__enter__()
    runtime = running.server.core.repository.get("linear")
    original = runtime.compute
    started = threading.Event()

    def slow_compute(*args: Any, **kwargs: Any) -> Any:
        started.set()
        time.sleep(1.0)
        return original(*args, **kwargs)

    runtime.compute = slow_compute  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    client = running.client()

    def call() -> None:
        try:
            results["ok"] = client.explain("linear", np.ones((1, *LINEAR_SHAPE), np.float32))
        except SalienceError as err:
            results["error"] = err

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(30)
    running.call(running.server.stop(grace=10.0))
    caller.join(30)
    assert "error" not in results, results.get("error")
    assert results["ok"].maps["absolute"].shape == (1, 6, 5)
    with pytest.raises(SalienceError) as caught:
        client.predict("linear", np.ones((1, *LINEAR_SHAPE), np.float32), timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    client.close()
    context.__exit__(None, None, None)


def test_unexpected_failure_is_internal_and_leaks_nothing(repo: Path, server_factory: Any) -> None:
    running = server_factory(repo)
    runtime = running.server.core.repository.get("softmax")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret path /opt/models/weights.bin")

    runtime.predict = broken  # type: ignore[method-assign]
    with running.client() as client:
        with pytest.raises(SalienceError) as caught:
            client.predict("softmax", np.ones((1, *LINEAR_SHAPE), np.float32))
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert "secret" not in caught.value.details
        assert "Predict" in caught.value.details
        assert client.predict("linear", np.ones((1, *LINEAR_SHAPE), np.float32)).model_version == 1
