"""The dashboard and the alert rules against a real Prometheus scraping a real server.

One scenario, run once for the module: a server on a small repository (`linear` for
ordinary traffic, `held` whose batches wait to be flushed so its queue can be filled
and overflow, `idle` that nobody calls, `broken` that fails to load), and Prometheus
(/usr/bin/prometheus, scraping every second and evaluating the real
deploy/prometheus/alerts.yml every second). Traffic comes in two rounds: a warm-up
that creates every series (a counter's first sample shows no increase, so rates only
see the second round), then a measured round, whose window the checks evaluate the
dashboard over, so numbers can be compared with the calls sent.

An increase Prometheus computes over a window is the change between the first and
last samples in it, stretched towards the window's edges (by how much differs from
series to series: a histogram's buckets would disagree). So the window is cut to the
scrapes: it opens 1 ms before the last scrape before the measured round and closes at
the first scrape that holds all of it. Every increase is then n (what was sent) times
at most (span + 1 ms) / span, and the checks compare with exactly those bounds.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from salience.v1 import salience_pb2_grpc
from salience_client.client import explanation_request, predict_request
from salience_server.metrics import LATENCY_BUCKETS
from tests.conftest import RunningServer, running_server
from tests.deploy.observability import (
    ALERTS,
    DEVICE_MEMORY_PANEL,
    alert_rules,
    dashboard,
    duration_seconds,
    panels,
    program,
    save_linear_model,
    substitute,
    targets,
)

SHAPE = (6, 5, 3)
# `held` keeps every batch until the test flushes it (the longest delay allowed), and
# holds at most 4 samples: two requests of 2 fill it, a third is refused.
HELD_CONFIG = """
[batching]
max_queue_delay_ms = 60000.0
max_device_batch_size = 8
max_queue_size = 4

[limits]
max_batch_size = 2
"""
HELD_CAPACITY = 4
DEFAULT_CAPACITY = 256  # the server's max_queue_size
# What Grafana sends for `$model` with both models with traffic selected.
SELECTION = "(linear|held)"
WAIT_SECONDS = 30.0


# Prometheus ---------------------------------------------------------------------------


class PrometheusError(AssertionError):
    """Prometheus refused a query: the message is its own."""


@dataclass
class Prometheus:
    """The HTTP API of a running Prometheus."""

    url: str

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body["status"] != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's series (a range selector's too: then with `values`)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.get("/api/v1/query", **params)
        result: list[dict[str, Any]] = data["result"]
        assert data["resultType"] in {"vector", "matrix"}, (expr, data["resultType"])
        return result

    def values(
        self, expr: str, at: float | None = None
    ) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's value by label set."""
        return {
            tuple(sorted(series["metric"].items())): float(series["value"][1])
            for series in self.query(expr, at)
        }

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        found = self.query(expr, at)
        assert len(found) <= 1, (expr, found)
        return float(found[0]["value"][1]) if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_prometheus(root: Path, metrics_port: int) -> Iterator[Prometheus]:
    """Prometheus scraping 127.0.0.1:metrics_port every second, with the real rules."""
    binary = program("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "salience",  # the name SalienceTargetDown selects
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = root / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            prometheus = Prometheus(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                assert process.poll() is None, f"prometheus exited: {log_path.read_text()}"
                try:
                    with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"prometheus not ready: {log_path.read_text()}"
                time.sleep(0.1)
            yield prometheus
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# The scenario -------------------------------------------------------------------------


@dataclass
class Round:
    """What one round of traffic sent: calls by (rpc, model, method, code)."""

    calls: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # client latency of linear's calls

    def count(self, **labels: str) -> int:
        keys = ("rpc", "model", "method", "code")
        return sum(
            n
            for key, n in self.calls.items()
            if all(dict(zip(keys, key, strict=True))[k] == v for k, v in labels.items())
        )


@dataclass
class Scenario:
    running: RunningServer
    prometheus: Prometheus
    warm_up: Round
    measured: Round
    start: float  # the scrapes before and after the measured round
    end: float
    device_calls: int  # linear's device calls and samples during the measured round
    device_samples: int
    alerts_seen: list[dict[str, Any]]  # /api/v1/alerts while `held` was full
    seen_at: float

    @property
    def milliseconds(self) -> int:
        """The window: from 1 ms before the first scrape to the last (timestamps are
        whole milliseconds), so both are inside it whatever side is open."""
        return round((self.end - self.start) * 1000) + 1

    @property
    def window(self) -> str:
        return f"{self.milliseconds}ms"

    @property
    def seconds(self) -> float:
        return self.milliseconds / 1000

    def bounds(self, n: float) -> tuple[float, float]:
        """Where an increase over the window of a counter that grew by n must lie."""
        return n, n * self.milliseconds / (self.milliseconds - 1)


def build_repository(root: Path) -> Path:
    save_linear_model(root, "linear")
    shutil.copytree(root / "linear", root / "held")
    (root / "held" / "config.toml").write_text(HELD_CONFIG)
    shutil.copytree(root / "linear", root / "idle")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.keras").write_bytes(b"not a zip archive")
    return root


def batcher(running: RunningServer, model: str) -> Any:
    """The model's batcher (made by its first request), or None before that."""

    async def get() -> Any:
        return running.server.core.batchers.get((model, 1))

    return running.call(get())


def send_round(stub: Any, repeats: int, rng: np.random.Generator) -> Round:
    """Predictions and four explanation methods on `linear`, callers' mistakes, and an
    unknown model; every call is answered before the next is sent (one device call each).
    """
    sent = Round()

    def call(rpc: str, model: str, method: str, request: Any) -> None:
        start = time.perf_counter()
        try:
            getattr(stub, rpc)(request, timeout=60)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        if model == "linear":
            sent.seconds.append(time.perf_counter() - start)
        key = (rpc, model, method, code)
        sent.calls[key] = sent.calls.get(key, 0) + 1

    def rows(n: int) -> np.ndarray:
        return rng.normal(size=(n, *SHAPE)).astype(np.float32)

    for _ in range(repeats):
        for n in (1, 2, 3):
            call("Predict", "linear", "predict", predict_request("linear", rows(n)))
        explanations: list[tuple[str, dict[str, Any]]] = [
            ("vanilla", {}),
            ("smoothgrad", {"samples": 4, "seed": 1}),
            ("integrated-gradients", {"steps": 8}),
            ("gradient-x-input", {}),
        ]
        for method, extra in explanations:
            request = explanation_request(
                "linear", rows(2), method=method, filter_indices=[0], **extra
            )
            call("Explain", "linear", method, request)
        # Callers' mistakes: a wrong input shape, an unknown method, Grad-CAM on a
        # model without a convolution; and a model nobody serves (label model="").
        call("Predict", "linear", "predict", predict_request("linear", rows(1)[:, :2]))
        bad = explanation_request("linear", rows(1), method="no_such_method", filter_indices=[0])
        call("Explain", "linear", "", bad)
        gradcam = explanation_request("linear", rows(1), method="gradcam", filter_indices=[0])
        call("Explain", "linear", "gradcam", gradcam)
        call("Predict", "", "predict", predict_request("missing", rows(1)))
    return sent


def overflow_held(
    running: RunningServer, stub: Any, sent: Round, while_full: Callable[[], None]
) -> None:
    """Fills `held`'s queue with two held requests, has a third refused, runs
    `while_full`, then flushes the queue and collects the two answers."""
    x = np.ones((2, *SHAPE), np.float32)
    waiting = [stub.Predict.future(predict_request("held", x), timeout=120) for _ in range(2)]
    wait_for("held's queue to fill", lambda: running.queued("held") == HELD_CAPACITY)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(predict_request("held", x[:1]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    while_full()
    held = batcher(running, "held")

    async def flush() -> None:
        held.flush()

    running.call(flush())
    for future in waiting:
        future.result()
    for code, n in (("OK", 2), ("RESOURCE_EXHAUSTED", 1)):
        key = ("Predict", "held", "predict", code)
        sent.calls[key] = sent.calls.get(key, 0) + n


def total_calls(*rounds: Round) -> int:
    return sum(sum(r.calls.values()) for r in rounds)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("prometheus-real")
    repo = build_repository(root / "repo")
    rng = np.random.default_rng(5)
    (root / "prometheus").mkdir()
    with (
        running_server(repo, metrics_port=0) as running,
        running_prometheus(root / "prometheus", running.server.metrics_port) as prometheus,
        grpc.insecure_channel(running.target) as channel,
    ):
        stub = salience_pb2_grpc.SalienceStub(channel)
        warm_up = send_round(stub, 1, rng)
        seen: dict[str, Any] = {}

        def alerts_pending() -> bool:
            seen["alerts"] = prometheus.get("/api/v1/alerts")["alerts"]
            seen["at"] = time.time()
            names = {(a["labels"]["alertname"], a["labels"].get("model")) for a in seen["alerts"]}
            return {
                ("SalienceQueueNearFull", "held"),
                ("SalienceModelFailedToLoad", "broken"),
            } <= names

        def provoked() -> None:
            # Held full until the rules have seen it, Prometheus has scraped the
            # refusal (so the next one is an increase), and for at least a second
            # (so `held` breaks its 0.5 s Predict latency target).
            full_since = time.monotonic()
            wait_for("the alerts to go pending", alerts_pending)
            wait_for(
                "the refusal to be scraped",
                lambda: (
                    prometheus.scalar('sum(salience_requests_refused_total{model="held"})') == 1
                ),
            )
            time.sleep(max(0.0, 1.0 - (time.monotonic() - full_since)))

        overflow_held(running, stub, warm_up, provoked)

        def scraped(*rounds: Round) -> Callable[[], bool]:
            return lambda: prometheus.scalar("sum(salience_requests_total)") == total_calls(*rounds)

        wait_for("the warm-up to be scraped", scraped(warm_up))

        # The window opens at a scrape that holds the warm-up and none of what follows.
        def last_scrape() -> float:
            return prometheus.scalar('max(timestamp(up{job="salience"}))') or 0.0

        now = time.time()
        wait_for("a scrape after the warm-up", lambda: last_scrape() > now)
        start = last_scrape()
        linear = batcher(running, "linear")
        calls, samples = linear.stats.calls, linear.stats.samples
        measured = send_round(stub, 3, rng)
        overflow_held(running, stub, measured, lambda: None)
        device_calls = linear.stats.calls - calls
        device_samples = linear.stats.samples - samples
        wait_for("the measured round to be scraped", scraped(warm_up, measured))
        end = last_scrape()
        yield Scenario(
            running=running,
            prometheus=prometheus,
            warm_up=warm_up,
            measured=measured,
            start=start,
            end=end,
            device_calls=device_calls,
            device_samples=device_samples,
            alerts_seen=seen["alerts"],
            seen_at=seen["at"],
        )


# The checks ---------------------------------------------------------------------------


def test_the_traffic_got_the_status_codes_it_was_meant_to(scenario: Scenario) -> None:
    measured = scenario.measured.calls
    assert measured == {
        ("Predict", "linear", "predict", "OK"): 9,
        ("Explain", "linear", "vanilla", "OK"): 3,
        ("Explain", "linear", "smoothgrad", "OK"): 3,
        ("Explain", "linear", "integrated-gradients", "OK"): 3,
        ("Explain", "linear", "gradient-x-input", "OK"): 3,
        ("Predict", "linear", "predict", "INVALID_ARGUMENT"): 3,
        ("Explain", "linear", "", "INVALID_ARGUMENT"): 3,
        ("Explain", "linear", "gradcam", "FAILED_PRECONDITION"): 3,
        ("Predict", "", "predict", "NOT_FOUND"): 3,
        ("Predict", "held", "predict", "OK"): 2,
        ("Predict", "held", "predict", "RESOURCE_EXHAUSTED"): 1,
    }
    # Prometheus holds exactly these counts (both rounds), label for label.
    stored = scenario.prometheus.values("salience_requests_total", scenario.end)
    counted: dict[tuple[str, str, str, str], float] = {}
    for labels_key, value in stored.items():
        # Prometheus drops empty labels: model="" (unknown models) and method="".
        labels = dict(labels_key)
        key = (labels["rpc"], labels.get("model", ""), labels.get("method", ""), labels["code"])
        counted[key] = value
    both = {
        key: scenario.warm_up.calls.get(key, 0) + measured.get(key, 0)
        for key in scenario.warm_up.calls.keys() | measured.keys()
    }
    assert counted == both


def test_the_window_opens_and_closes_at_scrapes(scenario: Scenario) -> None:
    (scrapes,) = scenario.prometheus.query(f'up{{job="salience"}}[{scenario.window}]', scenario.end)
    stamps = [float(t) for t, _ in scrapes["values"]]
    assert (stamps[0], stamps[-1]) == (scenario.start, scenario.end)
    assert scenario.start < scenario.end
    # The measured round is all inside: its first scrape has only the warm-up.
    before = scenario.prometheus.scalar("sum(salience_requests_total)", scenario.start)
    after = scenario.prometheus.scalar("sum(salience_requests_total)", scenario.end)
    assert (before, after) == (
        total_calls(scenario.warm_up),
        total_calls(scenario.warm_up, scenario.measured),
    )


def test_every_rule_of_the_real_file_is_loaded_and_healthy(scenario: Scenario) -> None:
    groups = scenario.prometheus.get("/api/v1/rules")["groups"]
    assert {g["file"] for g in groups} == {str(ALERTS)}
    loaded = [rule for group in groups for rule in group["rules"]]
    assert [r["name"] for r in loaded] == [r["alert"] for r in alert_rules()]
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert not rule.get("lastError"), rule["name"]
        assert rule["type"] == "alerting"
    # Durations, labels and annotations came through as written.
    for rule, written in zip(loaded, alert_rules(), strict=True):
        assert rule["duration"] == duration_seconds(written["for"])
        assert rule["labels"] == written["labels"]
        assert rule["annotations"] == written["annotations"]


def test_a_failed_model_and_a_full_queue_set_off_their_alerts(scenario: Scenario) -> None:
    by_name = {
        (a["labels"]["alertname"], a["labels"].get("model")): a for a in scenario.alerts_seen
    }
    failed = by_name["SalienceModelFailedToLoad", "broken"]
    # Pending: both wait out their `for` (1m, 3m), longer than this test runs.
    assert failed["state"] == "pending"
    assert failed["labels"]["severity"] == "critical"
    assert failed["annotations"]["summary"] == "Model broken: 1 version(s) failed to load"
    assert float(failed["value"]) == 1
    full = by_name["SalienceQueueNearFull", "held"]
    assert full["state"] == "pending"
    assert full["labels"]["severity"] == "warning"
    assert full["annotations"]["summary"].startswith("Model held: its queue is ")
    # The queue held 4 of 4 samples for every scrape but perhaps its first ones.
    assert 0.8 < float(full["value"]) <= 1
    # No other model was in either state.
    assert {m for (name, m) in by_name if name == "SalienceModelFailedToLoad"} == {"broken"}
    assert {m for (name, m) in by_name if name == "SalienceQueueNearFull"} == {"held"}


def test_every_rule_expression_picks_the_right_models(scenario: Scenario) -> None:
    expected = {
        # Its refusal is RESOURCE_EXHAUSTED (overload); linear's errors were all the
        # callers' (INVALID_ARGUMENT, FAILED_PRECONDITION), and so is model="".
        "SalienceHighErrorRatio": {"held"},
        # `held`'s first two predictions waited over a second for their flush;
        # everything else took milliseconds on a tiny model.
        "SaliencePredictLatencyHigh": {"held"},
        "SalienceExplainLatencyHigh": set(),
        "SalienceModelFailedToLoad": {"broken"},
        # Ready and never called; `broken` is not ready, the others were called.
        "SalienceModelIdle": {"idle"},
    }
    for rule in alert_rules():
        name = rule["alert"]
        found = scenario.prometheus.query(rule["expr"], scenario.end)
        if name == "SalienceTargetDown":
            assert found == []  # the target answered every scrape
        elif name == "SalienceQueueNearFull":
            # Evaluated while `held` was full: the queue alert's moment.
            during = scenario.prometheus.query(rule["expr"], scenario.seen_at)
            assert {s["metric"]["model"] for s in during} == {"held"}
        else:
            assert {s["metric"]["model"] for s in found} == expected[name], name


def test_every_dashboard_query_has_data_but_device_memory_on_a_cpu(scenario: Scenario) -> None:
    board = dashboard()
    on_gpu = scenario.running.server.placement.is_gpu
    for title, expr in targets(board):
        query = substitute(expr, SELECTION, scenario.window)
        found = scenario.prometheus.query(query, scenario.end)
        if title == DEVICE_MEMORY_PANEL and not on_gpu:
            # The one panel allowed to be empty: a CPU server has no such gauge.
            assert found == [], found
            continue
        finite = [s for s in found if math.isfinite(float(s["value"][1]))]
        assert finite, f"panel {title!r} has no data: {query}"
    # The model variable's values: the models with traffic (Prometheus keeps no empty
    # label, so unknown models' model="" is not among them).
    values = scenario.prometheus.get(
        "/api/v1/label/model/values", **{"match[]": "salience_requests_total"}
    )
    assert set(values) == {"linear", "held"}


def panel_values(scenario: Scenario, title: str, model: str) -> list[dict[str, Any]]:
    """Every series of a panel's queries for one model: its labels and its value."""
    (panel,) = (p for p in panels(dashboard()) if p["title"] == title)
    rows: list[dict[str, Any]] = []
    for target in panel["targets"]:
        query = substitute(target["expr"], model, scenario.window)
        for series in scenario.prometheus.query(query, scenario.end):
            rows.append(
                {**series["metric"], "ref": target["refId"], "value": float(series["value"][1])}
            )
    return rows


def within(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    return low * (1 - 1e-9) <= value <= high * (1 + 1e-9)


def test_the_panels_count_what_was_sent(scenario: Scenario) -> None:
    seconds = scenario.seconds
    sent = scenario.measured

    # Request rate by method, against the calls sent in the window.
    rates = {
        r.get("method", ""): r["value"] for r in panel_values(scenario, "Request rate", "linear")
    }
    methods = ("predict", "vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input")
    for method in (*methods, "gradcam", ""):
        n = sent.count(model="linear", method=method)
        assert within(rates[method] * seconds, scenario.bounds(n)), (method, rates[method], n)

    # Error ratio: no server-side failure on linear; the callers' codes in proportion
    # (each rate stretched by its own factor, so the ratio within their quotient).
    ratio = {
        r["code"] if r["ref"] == "B" else "server": r["value"]
        for r in panel_values(scenario, "Error ratio", "linear")
    }
    assert ratio["server"] == 0
    _, high = scenario.bounds(1)
    total = sent.count(model="linear")
    for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        share = sent.count(model="linear", code=code) / total
        assert share / high <= ratio[code] <= share * high, (code, ratio[code], share)
    assert set(ratio) == {"server", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}

    # Batch sizes: every device call is in the heatmap's +Inf bucket.
    assert scenario.device_calls == sent.count(model="linear", code="OK")
    # Three repeats of predictions of 1, 2 and 3 rows and four explanations of 2 rows.
    assert scenario.device_samples == 3 * (1 + 2 + 3 + 4 * 2)
    heat = {
        r["le"]: r["value"] for r in panel_values(scenario, "Batch size distribution", "linear")
    }
    assert within(heat["+Inf"], scenario.bounds(scenario.device_calls))
    samples = panel_values(scenario, "Samples computed", "linear")
    assert within(
        sum(r["value"] for r in samples) * seconds, scenario.bounds(scenario.device_samples)
    )
    # And the totals exactly, warm-up included, against the batcher's own counts.
    linear = batcher(scenario.running, "linear")
    prometheus = scenario.prometheus
    assert prometheus.scalar('salience_batch_size_count{model="linear"}', scenario.end) == (
        linear.stats.calls
    )
    assert prometheus.scalar('salience_batch_size_sum{model="linear"}', scenario.end) == (
        linear.stats.samples
    )

    # Latency: p50 <= p90 <= p99, all within the bucket of the slowest call the client
    # saw (the server's time is part of the client's).
    slowest = max(sent.seconds)
    ceiling = min(b for b in LATENCY_BUCKETS if b >= slowest)
    latency: dict[tuple[str, str], float] = {}
    for r in panel_values(scenario, "Latency percentiles", "linear"):
        latency[r.get("method", ""), r["ref"]] = r["value"]
    for method in methods:
        p50, p90, p99 = (latency[method, ref] for ref in "ABC")
        assert 0 < p50 <= p90 <= p99 <= ceiling, (method, p50, p90, p99, ceiling)

    # Queues: empty now, with their configured capacities.
    depth = {
        (r["model"], r["ref"]): r["value"] for r in panel_values(scenario, "Queue depth", SELECTION)
    }
    assert depth == {
        ("linear", "A"): 0,
        ("held", "A"): 0,
        ("linear", "B"): DEFAULT_CAPACITY,
        ("held", "B"): HELD_CAPACITY,
    }
    refused = panel_values(scenario, "Refused requests", SELECTION)
    assert [(r["model"], r["reason"]) for r in refused] == [("held", "queue_full")]
    assert within(refused[0]["value"] * seconds, scenario.bounds(1))

    # Versions by state: one each, failed only for `broken`; zero states hidden.
    versions = {
        (r["model"], r["state"]): r["value"]
        for r in panel_values(scenario, "Model versions by state", SELECTION)
    }
    assert versions == {
        ("linear", "ready"): 1,
        ("held", "ready"): 1,
        ("idle", "ready"): 1,
        ("broken", "failed"): 1,
    }
    # Everything sent has been answered.
    in_flight = {r["rpc"]: r["value"] for r in panel_values(scenario, "Requests in flight", "")}
    assert in_flight["Predict"] == in_flight["Explain"] == 0
