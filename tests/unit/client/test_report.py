"""The pictures and the page of `salience review` and `salience explain`, by value:
strips put each panel exactly in its box, titles size the picture to the text, the
report embeds what it is given (and survives hostile frame ids), the timeline
places each frame where its value says.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience_client import report
from salience_client.review import natural_key
from tests.e2e.review_clip import report_data


def test_nice_ticks_are_round_and_inside_the_range() -> None:
    assert report.nice_ticks(-0.66, 0.5) == [-0.5, 0.0, 0.5]
    assert report.nice_ticks(-1.0, 1.0) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert report.nice_ticks(0.0, 10.0) == [0.0, 5.0, 10.0]
    assert report.nice_ticks(0.1, 0.13) == pytest.approx([0.1, 0.11, 0.12, 0.13])
    assert report.nice_ticks(3.0, 3.0) == [3.0]


def test_class_title_names_the_prediction_and_the_explained_class() -> None:
    labels = ["circle", "square", "triangle", "star"]
    scores = np.array([0.05, 0.1, 0.8, 0.05])
    assert report.class_title(scores, labels) == "triangle 0.80"
    assert report.class_title(scores, labels, explained=2) == "triangle 0.80"
    assert report.class_title(scores, labels, explained=1) == "triangle 0.80 · map: square 0.10"
    # The server's label wins over the arg-max (it is the same, named by the server).
    assert report.class_title(scores, labels, predicted="TRI") == "TRI 0.80"


def test_class_titles_only_for_a_model_that_names_its_classes() -> None:
    metadata = pb.ModelMetadata(
        outputs=[
            pb.TensorSpec(name="logits", shape=[-1, 3]),
            pb.TensorSpec(name="probs", shape=[-1, 3], labels=["a", "b", "c"]),
        ]
    )
    outputs = {"logits": np.zeros((2, 3)), "probs": np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])}
    # The objective's unit is of the first output ("logits"), not the labelled one.
    assert report.class_titles(metadata, outputs, [], filter_indices=[2]) == ["b 0.70", "a 0.60"]
    assert report.class_titles(
        metadata, outputs, ["b", "a"], output="probs", filter_indices=[2]
    ) == [
        "b 0.70 · map: c 0.10",
        "a 0.60 · map: c 0.10",
    ]
    unnamed = pb.ModelMetadata(outputs=[pb.TensorSpec(name="logits", shape=[-1, 3])])
    assert report.class_titles(unnamed, outputs, []) is None


def test_a_strip_puts_each_panel_in_its_box() -> None:
    rng = np.random.default_rng(0)
    panels = [(f"p{k}", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)) for k in range(3)]
    strip = report.frame_strip(panels, "a title", scale=3)
    layout = report.strip_layout((5, 7), 3, 3)
    assert strip.shape == (layout.size[1], layout.size[0], 3)
    for (_, rgb), (left, top, right, bottom) in zip(panels, layout.boxes, strict=True):
        assert (right - left, bottom - top) == (21, 15)
        np.testing.assert_array_equal(strip[top:bottom, left:right], report.enlarge(rgb, 3))
    # The title is drawn above the panels: ink in the title line, none below it in
    # the margins between panels.
    title_rows = strip[: layout.boxes[0][1] - report._text_height(report.LABEL_PX)]
    assert (title_rows < 128).any()
    red = report.frame_strip(panels, "a title", scale=3, alert=True)
    assert ((red[..., 0] > 150) & (red[..., 1] < 100)).any()
    with pytest.raises(ValueError, match="panel 'p1'"):
        report.frame_strip([panels[0], ("p1", panels[1][1][:4])], "x")


def test_titled_enlarges_small_images_to_fit_the_title() -> None:
    rgb = np.full((4, 8, 3), 7, dtype=np.uint8)
    out = report.titled(rgb, "short")
    assert out.shape[1] == report.MIN_TITLED_WIDTH  # 8 × 24
    bar = out.shape[0] - 4 * 24
    np.testing.assert_array_equal(out[bar:], report.enlarge(rgb, 24))
    wide = report.titled(rgb, "a very long title " * 4)
    assert wide.shape[1] > report.MIN_TITLED_WIDTH
    assert wide.shape[1] % 8 == 0  # a whole factor


def frame(k: int, value: float, jump: bool = False, name: str = "") -> report.ReportFrame:
    pixels = np.full((6, 10, 3), 10 * k, dtype=np.uint8)
    return report.ReportFrame(
        frame_id=name or f"f{k}",
        value=value,
        delta=None if k == 0 else 0.5,
        jump=jump,
        strip_png=report.png_bytes(pixels),
        thumbnail_jpeg=report.jpeg_bytes(pixels),
        file=f"f{k}.png",
    )


INFO = report.ReportInfo(
    title="t", model="m", version=3, output="steering", method="vanilla", threshold=0.2, source="s"
)


def test_the_report_embeds_its_frames_even_with_hostile_ids(tmp_path: Path) -> None:
    hostile = '</script><script>alert("x")</script> & <b>'
    frames = [frame(0, 0.1), frame(1, -0.4, jump=True, name=hostile), frame(2, -0.3)]
    path = report.write_report(tmp_path / "r.html", INFO, frames)
    text = path.read_text()
    data = report_data(path)
    assert [f["id"] for f in data["frames"]] == ["f0", hostile, "f2"]
    assert [f["jump"] for f in data["frames"]] == [False, True, False]
    assert data["frames"][1]["strip"] == report.data_uri(frames[1].strip_png, "image/png")
    # The id never appears raw in the markup: only escaped, or inside the JSON.
    assert text.count("<script") == 2
    assert len(re.findall(r'<button type="button" class="thumb', text)) == 3
    assert len(re.findall(r'class="thumb jump"', text)) == 1
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text


def test_the_timeline_places_each_frame_by_its_value() -> None:
    values = [0.0, 0.5, -0.5, 0.25]
    svg = report.timeline_svg([frame(k, v) for k, v in enumerate(values)], INFO)
    found = re.search(r'class="series" points="([^"]+)"', svg)
    assert found is not None
    points = np.array([[float(c) for c in p.split(",")] for p in found.group(1).split()])
    low, high = report._scale(min(values), max(values))
    left, top, right, bottom = report._PLOT
    width, height = report.TIMELINE_SIZE
    plot_w, plot_h = width - left - right, height - top - bottom
    np.testing.assert_allclose(points[:, 0], left + plot_w * np.arange(4) / 3, atol=0.05)
    expected_y = top + plot_h * (high - np.array(values)) / (high - low)
    np.testing.assert_allclose(points[:, 1], expected_y, atol=0.05)
    assert svg.count("<circle") == 4


def test_frames_sort_by_their_numbers() -> None:
    names = ["f10.png", "f2.png", "F1.png", "f2b.png"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == [
        "F1.png",
        "f2.png",
        "f2b.png",
        "f10.png",
    ]


def test_review_modules_import_without_tensorflow() -> None:
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "salience_server", "av", "selenium"}:
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, Refuse())
import salience_client.review, salience_client.report, salience_client.stream
from salience_client.cli.entry import build_parser
build_parser()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_linked_strips_name_their_files_instead_of_embedding_them(tmp_path: Path) -> None:
    frames = [frame(0, 0.1), frame(1, -0.4, name="a b"), frame(2, 0.2)]
    frames[1] = dataclasses.replace(frames[1], file="frames/a b.png")
    embedded = report.write_report(tmp_path / "e.html", INFO, frames)
    linked = report.write_report(tmp_path / "l.html", INFO, frames, link_strips=True)
    strips = [f["strip"] for f in report_data(linked)["frames"]]
    # Relative URLs of the files, escaped as URLs; no strip is embedded.
    assert strips == ["f0.png", "frames/a%20b.png", "f2.png"]
    assert 'id="large" src="f0.png"' in linked.read_text()
    assert "data:image/png" not in linked.read_text()
    assert linked.stat().st_size < embedded.stat().st_size
    # The thumbnails stay embedded: the timeline works without the files.
    assert linked.read_text().count("data:image/jpeg") == 3
    nameless = [frame(0, 0.1), dataclasses.replace(frame(1, 0.2), file="")]
    with pytest.raises(ValueError, match="linked strips need each frame's file"):
        report.render_report(INFO, nameless, link_strips=True)
