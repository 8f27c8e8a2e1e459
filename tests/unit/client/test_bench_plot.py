"""The latency plot of `salience bench`: the drawn values are the run's own."""

from __future__ import annotations

import itertools
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


def _visible_tick_labels(figure: object, axis: object) -> list[tuple[str, object]]:
    """The x tick labels drawn inside the axis's limits, with their boxes on the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # type: ignore[arg-type]
    canvas.draw()
    renderer = canvas.get_renderer()
    low, high = sorted(axis.axes.get_xlim())  # type: ignore[attr-defined]
    found = []
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:  # type: ignore[attr-defined]
        label = tick.label1
        if label.get_visible() and label.get_text() and low <= tick.get_loc() <= high:
            found.append((label.get_text(), label.get_window_extent(renderer)))
    return found


def test_the_histogram_tick_labels_do_not_overlap(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    spreads = {
        "narrow": rng.normal(0.0497, 0.0008, 400),  # 47-52 ms: inside one decade
        "decade": rng.lognormal(np.log(0.02), 0.5, 400),
        "wide": rng.lognormal(np.log(0.02), 2.0, 400),  # a cached ms to a queued second
    }
    for name, latencies in spreads.items():
        figure = plot(result_of(list(np.abs(latencies))), tmp_path / f"{name}.png")
        hist, curve = figure.axes
        for axis in (hist.xaxis, curve.xaxis):
            labels = _visible_tick_labels(figure, axis)
            assert len(labels) >= 2, (name, labels)
            # Plain numbers, not 4.7×10¹.
            assert all(float(text) > 0 or axis is curve.xaxis for text, _ in labels), labels
            boxes = sorted(labels, key=lambda item: item[1].x0)
            for (left, a), (right, b) in itertools.pairwise(boxes):
                assert a.x1 < b.x0, f"{name}: tick labels {left!r} and {right!r} overlap"


def test_legend_and_text_give_the_same_digits(tmp_path: Path) -> None:
    # 49.7051 ms: rounded to 3 places first (49.705), then to 2, it became 49.70 in
    # the text while the legend, formatting the value once, said 49.71.
    result = result_of([0.0497051] * 3)
    figure = plot(result, tmp_path / "same.png")
    text = "\n".join(result.format())
    _, curve = figure.axes
    for label in (t.get_text() for t in curve.get_legend().get_texts()):
        name, value, _ = label.split(" ")
        assert f"{name} {value}" in text, (label, text)
