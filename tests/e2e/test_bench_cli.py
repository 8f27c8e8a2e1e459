"""`salience bench` end to end: the command line, in a subprocess, against a real
server on a tiny model. The figures it prints are checked against what the server
counted, and `--json` against the keys and counts the README documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.integration.models import LINEAR_SHAPE, build_repository

ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]
KEYS = {
    "target",
    "model",
    "rpc",
    "concurrency",
    "rate",
    "batch",
    "duration_s",
    "requests",
    "ok",
    "samples",
    "requests_per_s",
    "samples_per_s",
    "latency_ms",
    "errors",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> RunningServer:
    repo = build_repository(tmp_path_factory.mktemp("bench-repo"))
    running: RunningServer = server_factory(repo)
    return running


def bench(served: RunningServer, *args: str, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [*CLI, "bench", "--target", served.target, "--model", "linear", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def computed_samples(served: RunningServer) -> int:
    async def count() -> int:
        return sum(b.stats.samples for b in served.server.core.batchers.values())

    result: int = served.call(count())
    return result


def test_json_figures_match_what_the_server_computed(served: RunningServer) -> None:
    before = computed_samples(served)
    done = bench(
        served,
        "--rpc",
        "explain",
        "--requests",
        "40",
        "--concurrency",
        "4",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--filter-indices",
        "1,3",
        "--grad-modifier",
        "none,relu",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(figures) == KEYS
    assert figures["target"] == served.target
    assert (figures["model"], figures["rpc"]) == ("linear", "explain")
    assert (figures["concurrency"], figures["rate"], figures["batch"]) == (4, None, 2)
    assert (figures["requests"], figures["ok"], figures["samples"]) == (40, 40, 80)
    assert figures["errors"] == {}
    assert computed_samples(served) - before == 80
    lat = figures["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "max", "mean"}
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert figures["requests_per_s"] == pytest.approx(40 / figures["duration_s"], rel=0.01)
    assert figures["samples_per_s"] == pytest.approx(2 * figures["requests_per_s"], rel=0.01)


def test_oip_infer_goes_through_the_same_batcher(served: RunningServer) -> None:
    before = computed_samples(served)
    done = bench(
        served,
        "--rpc",
        "oip-infer",
        "--requests",
        "30",
        "--concurrency",
        "3",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(figures) == KEYS
    assert (figures["model"], figures["rpc"]) == ("linear", "oip-infer")
    assert (figures["requests"], figures["ok"], figures["samples"]) == (30, 30, 60)
    assert figures["errors"] == {}
    # Every ModelInfer was computed by the model's batcher, two samples each.
    assert computed_samples(served) - before == 60


def test_human_figures_for_a_timed_run(served: RunningServer) -> None:
    done = bench(served, "--rpc", "predict", "--duration", "1", "--concurrency", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"model linear at {served.target}"
    assert lines[1].startswith("predict: ")
    assert "(concurrency 2, 1 sample per request)" in lines[1]
    assert lines[2].startswith("throughput  ")
    assert "requests/s" in lines[2]
    assert "samples/s" in lines[2]
    assert lines[3].startswith("latency ms  p50 ")
    assert " p90 " in lines[3]
    assert " p99 " in lines[3]
    assert " max " in lines[3]
    assert lines[4] == "errors      none"
    assert "Traceback" not in done.stderr


def test_inputs_from_files_and_open_loop(served: RunningServer, tmp_path: Path) -> None:
    batch = np.random.default_rng(0).uniform(0, 1, (5, *LINEAR_SHAPE)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    before = computed_samples(served)
    done = bench(
        served,
        "--rpc",
        "predict",
        "--rate",
        "50",
        "--requests",
        "20",
        "--batch",
        "3",
        "--warmup",
        "0",
        "--json",
        "batch.npy",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["rate"], figures["requests"], figures["ok"], figures["samples"]) == (
        50.0,
        20,
        20,
        60,
    )
    assert computed_samples(served) - before == 60


def test_plot_draws_the_latencies_of_the_run(served: RunningServer, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "plots" / "latency.png"
    done = bench(
        served, "--rpc", "predict", "--requests", "30", "--warmup", "0", "--plot", str(out)
    )
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 400)
        # Not a blank canvas: the bars and curves are drawn in colour.
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20
    done = bench(served, "--requests", "1", "--plot", str(tmp_path / "latency.svg"))
    assert done.returncode == 2
    assert "--plot" in done.stderr
    assert "must name a .png file" in done.stderr


def test_errors_are_counted_by_status_code(served: RunningServer) -> None:
    done = bench(served, "--requests", "5", "--warmup", "0", "--layer", "no_such_layer", "--json")
    # Nothing succeeded: the figures are printed, and the exit status says so.
    assert done.returncode == 1
    figures = json.loads(done.stdout)
    assert (figures["requests"], figures["ok"]) == (5, 0)
    assert figures["errors"] == {"INVALID_ARGUMENT": 5}
    assert figures["latency_ms"]["p50"] is None


def test_usage_errors_exit_2(served: RunningServer) -> None:
    done = bench(served, "--duration", "1", "--requests", "3")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
    done = bench(served, "--concurrency", "0")
    assert done.returncode == 2
    assert "0 is not allowed: use 1 or more" in done.stderr


def test_the_load_generator_imports_without_tensorflow() -> None:
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "salience_server"}:
            raise ImportError(f"{name} must not be imported by the client")
sys.meta_path.insert(0, Refuse())
import salience_client.bench, tqdm
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
