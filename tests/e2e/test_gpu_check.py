"""scripts/gpu-check's CPU rehearsal, so that the script a GPU machine runs once
cannot rot: `--device cpu --rehearsal` with this environment (`--use-venv`, nothing
installed), one device test, the benchmarks at their smallest sizes. The Markdown
and the JSON must hold real figures: positive throughputs and latencies, every
configuration answered without errors, maps that agree with float32 under XLA and
with tf-keras-vis, and the same numbers in both files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check"
# About 95 s on 2 busy cores (four processes import TensorFlow); the fixture's run
# counts against its first test.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--device", "cpu", "--rehearsal",
         "--use-venv", str(Path(sys.executable).parents[1]),
         "--tests", "tests/integration/test_device.py -k placed", "--time-limit", "500"],
        capture_output=True, text=True, timeout=560, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "done in " in done.stdout
    return out


def test_the_rehearsal_writes_every_file(results: Path) -> None:
    names = {p.name for p in results.iterdir()}
    assert names == {"gpu-check.md", "gpu-check.json", "tests.xml", "bench.json", "gpu-check.log"}


def test_the_json_holds_real_figures(results: Path) -> None:
    data = json.loads((results / "gpu-check.json").read_text())
    assert data["ok"] is True
    assert data["rehearsal"] is True
    assert data["device"] == "cpu"
    phases = data["phases"]
    assert phases["install"]["skipped"].startswith("reused ")
    assert phases["probe"]["gpus"] == []
    assert phases["probe"]["matmul_device"].endswith("CPU:0")
    assert phases["tests"]["counts"] == {"passed": 1, "failed": 0, "skipped": 0}
    [case] = phases["tests"]["cases"]
    assert case["test"].endswith(
        "test_models_are_placed_on_the_device_and_compute_what_a_reference_computes"
    )
    assert case["outcome"] == "passed"

    figures = data["figures"]
    assert figures == json.loads((results / "bench.json").read_text())
    assert figures["model"]["input"] == [32, 32, 3]
    assert figures["model"]["parameters"] > 100_000
    assert [row["batch"] for row in figures["ideal"]] == [1, 4]
    for row in figures["ideal"]:
        assert row["images_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]

    # Front ends, where the server has the setting, add rows at the top concurrency.
    rows = [r for r in figures["service"]["rows"] if r["configuration"] in ("on", "off")]
    assert [(r["configuration"], r["concurrency"]) for r in rows] == [
        ("on", 1), ("off", 1), ("on", 4), ("off", 4),
    ]  # fmt: skip
    for row in figures["service"]["rows"]:
        assert row["errors"] == {}
        assert row["ok"] == row["requests"] > 0
        assert row["images_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    by = {(r["configuration"], r["concurrency"]): r for r in rows}
    # One request at a time is one sample per device call; batching off never merges.
    assert by["on", 1]["mean_batch"] == pytest.approx(1.0)
    assert by["off", 4]["mean_batch"] == pytest.approx(1.0)
    assert 1.0 <= by["on", 4]["mean_batch"] <= 4.0
    assert figures["service"]["device_memory_bytes"] is None  # a CPU has no gauge

    precision = {row["variant"]: row for row in figures["precision"]}
    assert set(precision) == {"float32", "XLA", "float16", "bfloat16"}
    assert precision["float32"]["map_max_abs_diff"] == 0.0
    assert precision["XLA"]["map_max_abs_diff"] < 1e-4  # the README's XLA tolerance
    for row in precision.values():
        assert row["ms_per_image"] > 0
    for variant in ("float16", "bfloat16"):  # the reduced types really computed
        assert precision[variant]["prediction_max_abs_diff"] > 0

    tkv = figures["tf_keras_vis"]
    assert tkv["map_correlation_min"] > 0.99  # the same maps, vanilla has no randomness
    assert tkv["tf_keras_vis_ms_per_request"] > 0
    assert tkv["ours_ms_per_request"] > 0

    derived = figures["derived"]
    assert derived["max_concurrency"] == 4
    assert derived["batching_on_over_off"] == pytest.approx(
        by["on", 4]["images_per_s"] / by["off", 4]["images_per_s"], rel=1e-2
    )
    best = max(row["images_per_s"] for row in figures["ideal"])
    assert derived["service_over_best_ideal"] == pytest.approx(
        by["on", 4]["images_per_s"] / best, rel=1e-2
    )
    assert derived["tf_keras_vis_speed_up"] == pytest.approx(
        tkv["tf_keras_vis_ms_per_request"] / tkv["ours_ms_per_request"], rel=1e-2
    )


def cell(markdown: str, row_start: str) -> list[str]:
    """The cells of the first table row starting with `row_start`."""
    for line in markdown.splitlines():
        if line.startswith(row_start):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {row_start!r} in:\n{markdown}")


def number(text: str) -> float:
    found = re.search(r"-?[\d,]+(\.\d+)?(e-?\d+)?", text)
    assert found, text
    return float(found.group(0).replace(",", ""))


def test_the_markdown_shows_the_same_figures(results: Path) -> None:
    markdown = (results / "gpu-check.md").read_text()
    figures = json.loads((results / "gpu-check.json").read_text())["figures"]
    assert markdown.startswith("# CPU rehearsal (small sizes: not GPU figures)")
    assert "## Device tests: 1 passed, 0 failed, 0 skipped" in markdown
    assert cell(markdown, "| tests |")[1] == "ok"
    assert cell(markdown, "| install |")[1].startswith("skipped: reused ")

    on4 = next(
        r
        for r in figures["service"]["rows"]
        if r["configuration"] == "on" and r["concurrency"] == 4
    )
    row = cell(markdown, "| batching on | 4 |")
    assert number(row[2]) == pytest.approx(on4["images_per_s"], abs=0.06)
    assert number(row[3]) == pytest.approx(on4["p50_ms"], abs=0.006)
    assert row[6] == "none"

    ideal1 = figures["ideal"][0]
    assert number(cell(markdown, "| 1 |")[1]) == pytest.approx(ideal1["images_per_s"], abs=0.06)

    derived = figures["derived"]
    share = cell(markdown, "| service (batching on) at c=4 / best in-process ideal |")[1]
    assert number(share) == pytest.approx(100 * derived["service_over_best_ideal"], abs=0.06)
    gain = cell(markdown, "| batching on / off at c=4 |")[1]
    assert number(gain) == pytest.approx(derived["batching_on_over_off"], abs=0.006)
    speed_up = cell(markdown, "| tf-keras-vis per request / ours per request (same device) |")[1]
    assert number(speed_up) == pytest.approx(derived["tf_keras_vis_speed_up"], abs=0.06)
    xla = cell(markdown, "| XLA against float32:")[1]
    assert number(xla) == pytest.approx(derived["XLA_map_max_abs_diff"], rel=0.1, abs=1e-4)
    assert cell(markdown, "| device memory gauge after the load |")[1] == "not reported (no GPU)"
    if not figures["service"]["frontends_setting"]:
        assert "the server has no `--frontends` setting" in markdown
