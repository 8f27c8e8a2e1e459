"""Prometheus exposition after known traffic: every scraped count, bucket and sum is
checked against what the test sent and received, not only that the names exist.
"""

from __future__ import annotations

import itertools
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client.tensors import encode
from salience_server.metrics import LATENCY_BUCKETS
from tests.conftest import RunningServer, running_server
from tests.integration.models import LINEAR_SHAPE, build_repository

# Rows per Predict on `linear`; Explain calls below add their own rows.
PREDICT_ROWS = (1, 2, 3, 1, 2)
VANILLA_ROWS = 2  # each of 3 vanilla Explain calls
SMOOTHGRAD_ROWS = 1  # each of 2 SmoothGrad calls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = build_repository(tmp_path_factory.mktemp("metrics-repo"))
    with running_server(repo, metrics_port=0) as running:
        yield running


def predict_request(model: str, x: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(model=pb.ModelSpec(name=model), inputs=[encode(x)])


def explain_request(model: str, x: np.ndarray, method: str, **extra: Any) -> pb.ExplainRequest:
    explanation = pb.Explanation(
        method=method, objectives=[pb.Objective(filter_indices=[0])], **extra
    )
    return pb.ExplainRequest(
        model=pb.ModelSpec(name=model), inputs=[encode(x)], explanation=explanation
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(running: RunningServer) -> Samples:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    port = running.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of `name` whose labels include `labels`."""
    return sum(
        v for (n, key), v in samples.items() if n == name and set(labels.items()) <= set(key)
    )


def test_scraped_metrics_match_the_traffic_sent(server: RunningServer) -> None:
    rng = np.random.default_rng(0)
    sent: dict[str, int] = {"Predict": 0, "Explain": 0}
    received: dict[str, int] = {"Predict": 0, "Explain": 0}
    codes: list[grpc.StatusCode] = []

    with grpc.insecure_channel(server.target) as channel:
        stub = salience_pb2_grpc.SalienceStub(channel)

        def call(rpc: str, request: Any) -> None:
            sent[rpc] += request.ByteSize()
            try:
                response = getattr(stub, rpc)(request, timeout=60)
            except grpc.RpcError as err:
                codes.append(err.code())
                return
            codes.append(grpc.StatusCode.OK)
            received[rpc] += response.ByteSize()

        def rows(n: int) -> np.ndarray:
            return rng.normal(size=(n, *LINEAR_SHAPE)).astype(np.float32)

        for n in PREDICT_ROWS:
            call("Predict", predict_request("linear", rows(n)))
        call("Predict", predict_request("softmax", rows(1)))
        for _ in range(3):
            call("Explain", explain_request("linear", rows(VANILLA_ROWS), "vanilla"))
        for _ in range(2):
            call(
                "Explain",
                explain_request("linear", rows(SMOOTHGRAD_ROWS), "smoothgrad", samples=4, seed=1),
            )
        # Two caller mistakes: an input of the wrong shape, an unknown method.
        call("Predict", predict_request("linear", np.zeros((1, 2, 2), np.float32)))
        call("Explain", explain_request("linear", rows(1), "no_such_method"))
        # A model nobody serves: counted, but not as a label of its own.
        call("Predict", predict_request("missing", rows(1)))

    ok, invalid, not_found = (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    )
    assert codes == [ok] * 11 + [invalid, invalid, not_found]

    samples = scrape(server)
    requests = "salience_requests_total"
    expected = {
        ("Predict", "linear", "predict", "OK"): 5,
        ("Predict", "softmax", "predict", "OK"): 1,
        ("Explain", "linear", "vanilla", "OK"): 3,
        ("Explain", "linear", "smoothgrad", "OK"): 2,
        ("Predict", "linear", "predict", "INVALID_ARGUMENT"): 1,
        ("Explain", "linear", "", "INVALID_ARGUMENT"): 1,
        ("Predict", "", "predict", "NOT_FOUND"): 1,
    }
    for (rpc, model, method, code), count in expected.items():
        labels = {"rpc": rpc, "model": model, "method": method, "code": code}
        assert value(samples, requests, **labels) == count, labels
    # Nothing else was counted for these RPCs (the unknown model left no label).
    for rpc in ("Predict", "Explain"):
        counted = total(samples, requests, rpc=rpc)
        assert counted == sum(c for key, c in expected.items() if key[0] == rpc)
    assert not any(dict(key).get("model") == "missing" for _, key in samples)

    # Latency: one observation per request, and the +Inf bucket holds them all.
    latency = "salience_request_duration_seconds"
    by_labels: dict[tuple[str, str, str], int] = {}
    for (rpc, model, method, _), count in expected.items():
        by_labels[rpc, model, method] = by_labels.get((rpc, model, method), 0) + count
    for (rpc, model, method), count in by_labels.items():
        labels = {"rpc": rpc, "model": model, "method": method}
        assert value(samples, f"{latency}_count", **labels) == count, labels
        assert value(samples, f"{latency}_bucket", le="+Inf", **labels) == count
        buckets = sorted(
            (float(dict(key)["le"]), count)
            for (name, key), count in samples.items()
            if name == f"{latency}_bucket" and dict(key) | {"le": ""} == labels | {"le": ""}
        )
        assert len(buckets) == len(LATENCY_BUCKETS) + 1
        # Cumulative buckets never decrease.
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        assert value(samples, f"{latency}_sum", **labels) > 0

    # Bytes: the serialized sizes of exactly what went over the wire.
    for rpc in ("Predict", "Explain"):
        calls = sum(c for key, c in expected.items() if key[0] == rpc)
        assert value(samples, "salience_request_bytes_sum", rpc=rpc) == sent[rpc]
        assert value(samples, "salience_request_bytes_count", rpc=rpc) == calls
        assert value(samples, "salience_request_bytes_bucket", rpc=rpc, le="+Inf") == calls
        oks = sum(c for key, c in expected.items() if key[0] == rpc and key[3] == "OK")
        assert value(samples, "salience_response_bytes_sum", rpc=rpc) == received[rpc]
        assert value(samples, "salience_response_bytes_count", rpc=rpc) == oks
        # Every call has been answered.
        assert value(samples, "salience_requests_in_flight", rpc=rpc) == 0

    # The batcher: every sample sent reached the device once; one queue wait each.
    linear_rows = sum(PREDICT_ROWS) + 3 * VANILLA_ROWS + 2 * SMOOTHGRAD_ROWS
    assert value(samples, "salience_batch_size_sum", model="linear") == linear_rows
    assert value(samples, "salience_batch_size_sum", model="softmax") == 1
    calls_to_device = len(PREDICT_ROWS) + 3 + 2
    assert value(samples, "salience_queue_wait_seconds_count", model="linear") == calls_to_device
    assert value(samples, "salience_queue_wait_seconds_bucket", model="linear", le="+Inf") == (
        calls_to_device
    )
    assert value(samples, "salience_samples_total", model="linear", kind="predict") == sum(
        PREDICT_ROWS
    )
    assert value(samples, "salience_samples_total", model="linear", kind="explain") == (
        3 * VANILLA_ROWS + 2 * SMOOTHGRAD_ROWS
    )
    assert value(samples, "salience_queue_depth", model="linear") == 0
    # A queue's capacity is its max_queue_size (here the server's, 256 by default);
    # `smooth` got no request, so it has no queue and no capacity yet.
    capacity = server.server.settings.max_queue_size
    assert capacity == 256
    assert value(samples, "salience_queue_capacity", model="linear") == capacity
    assert value(samples, "salience_queue_capacity", model="softmax") == capacity
    assert ("salience_queue_capacity", (("model", "smooth"),)) not in samples

    # One version of each model, ready; no other state.
    for model in ("linear", "softmax", "smooth"):
        for state in ("loading", "ready", "failed", "unloading"):
            got = value(samples, "salience_model_versions", model=model, state=state)
            assert got == (1 if state == "ready" else 0), (model, state)


def test_model_versions_follow_failures_and_hot_reload(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.keras").write_bytes(b"not a zip archive")

    def states(samples: Samples, model: str) -> dict[str, float]:
        return {
            state: value(samples, "salience_model_versions", model=model, state=state)
            for state in ("loading", "ready", "failed", "unloading")
        }

    zero = {"loading": 0.0, "ready": 0.0, "failed": 0.0, "unloading": 0.0}
    with running_server(repo, metrics_port=0, repository_poll_seconds=0.1) as running:
        samples = scrape(running)
        assert states(samples, "linear") == zero | {"ready": 1.0}
        assert states(samples, "broken") == zero | {"failed": 1.0}

        # A new model, copied in whole (renamed into place so no poll sees half of it).
        building = tmp_path / "building"
        shutil.copytree(repo / "linear", building)
        building.rename(repo / "copied")
        deadline = time.monotonic() + 60
        while states(scrape(running), "copied") != zero | {"ready": 1.0}:
            assert time.monotonic() < deadline, states(scrape(running), "copied")
            time.sleep(0.1)

        # A model removed from disk leaves the gauge once it is unloaded.
        shutil.rmtree(repo / "copied")
        while states(scrape(running), "copied") != zero:
            assert time.monotonic() < deadline, states(scrape(running), "copied")
            time.sleep(0.1)
        assert states(scrape(running), "linear") == zero | {"ready": 1.0}


def test_explain_stream_and_modelinfer_label_methods_alike(tmp_path: Path) -> None:
    # One rule labels every explanation RPC: the method asked for, `vanilla` when
    # none is named, "" for an unknown one (callers cannot grow the label set).
    from inference.v2 import grpc_service_pb2 as oip
    from inference.v2 import grpc_service_pb2_grpc

    x = np.random.default_rng(4).normal(size=(1, *LINEAR_SHAPE)).astype(np.float32)
    methods = ("", "gradient-x-input", "no_such_method")
    codes: dict[tuple[str, str], grpc.StatusCode] = {}
    repo = build_repository(tmp_path / "repo")
    with running_server(repo, metrics_port=0) as running:
        with grpc.insecure_channel(running.target) as channel:
            salience = salience_pb2_grpc.SalienceStub(channel)
            inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def infer(method: str) -> Any:
                request = oip.ModelInferRequest(model_name="linear")
                request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
                request.raw_input_contents.append(x.tobytes())
                request.outputs.add(name="saliency")
                request.parameters["filter_indices"].int64_param = 0
                if method:
                    request.parameters["method"].string_param = method
                return inference.ModelInfer(request, timeout=60)

            def stream(method: str) -> Any:
                first = explain_request("linear", x, method)
                frame = pb.ExplainStreamRequest(
                    frame_id="a",
                    inputs=first.inputs,
                    model=first.model,
                    explanation=first.explanation,
                )
                return list(salience.ExplainStream(iter([frame]), timeout=60))

            calls = {
                "Explain": lambda m: salience.Explain(explain_request("linear", x, m), timeout=60),
                "ExplainStream": stream,
                "ModelInfer": infer,
            }
            for rpc, call in calls.items():
                for method in methods:
                    try:
                        call(method)
                        codes[rpc, method] = grpc.StatusCode.OK
                    except grpc.RpcError as err:
                        codes[rpc, method] = err.code()
        samples = scrape(running)
    for rpc in calls:
        assert [codes[rpc, m] for m in methods] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
        ], rpc
        for method, code in (
            ("vanilla", "OK"),
            ("gradient-x-input", "OK"),
            ("", "INVALID_ARGUMENT"),
        ):
            labels = {"rpc": rpc, "model": "linear", "method": method, "code": code}
            assert value(samples, "salience_requests_total", **labels) == 1, labels
        assert total(samples, "salience_requests_total", rpc=rpc) == len(methods)
