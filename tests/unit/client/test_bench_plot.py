"""The latency plot of `salience bench`: the drawn values are the run's own."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from salience_client.bench import PLOT_PERCENTILES, BenchResult, plot


def result_of(latencies_s: list[float], errors: int = 0) -> BenchResult:
    codes = Counter({"OK": len(latencies_s)})
    if errors:
        codes["UNAVAILABLE"] = errors
    return BenchResult(
        rpc="explain",
        concurrency=4,
        rate=None,
        samples_per_request=1,
        elapsed=2.0,
        latencies=list(latencies_s),
        ok_latencies=list(latencies_s),
        codes=codes,
    )


def test_histogram_and_percentiles_hold_the_latencies(tmp_path: Path) -> None:
    latencies = list(np.random.default_rng(3).lognormal(np.log(0.02), 0.5, 500))
    figure = plot(result_of(latencies, errors=7), tmp_path / "lat.png")
    hist, curve = figure.axes
    ms = np.sort(np.asarray(latencies) * 1000.0)
    # Every OK request is in exactly one bar.
    heights = [patch.get_height() for patch in hist.patches]
    assert sum(heights) == 500
    # The curve is the sorted latencies against their rank.
    xs, ys = curve.lines[0].get_data()
    np.testing.assert_allclose(ys, ms)
    np.testing.assert_allclose(xs, 100.0 * np.arange(1, 501) / 500)
    marked = [line.get_ydata()[0] for line in curve.lines[1:]]
    np.testing.assert_allclose(marked, [np.percentile(ms, q) for q in PLOT_PERCENTILES])
    labels = [text.get_text() for text in curve.get_legend().get_texts()]
    assert labels == [f"p{q:g} {np.percentile(ms, q):.2f} ms" for q in PLOT_PERCENTILES]
    assert figure.get_suptitle().startswith("explain: 500 ok of 507 requests, concurrency 4")
    with Image.open(tmp_path / "lat.png") as image:
        assert image.size == (1000, 400)


def test_a_run_without_successes_still_draws(tmp_path: Path) -> None:
    figure = plot(result_of([], errors=3), tmp_path / "none.png")
    hist, _ = figure.axes
    assert [t.get_text() for t in hist.texts] == ["no request succeeded"]
    assert (tmp_path / "none.png").stat().st_size > 0
