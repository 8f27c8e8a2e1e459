"""`salience review` end to end: the command line, in a subprocess, against a real
server on the bundled demo models, on a 24-frame driving clip made with the
steering demo's data generator (PNG frames and an H.264 video of them).

Checked by value: every PNG's panels are the input and the overlays of the maps a
unary Explain gives for that frame; the report's values are a direct Predict's;
the flagged jumps are the frames where that Predict moves by more than the
threshold (the clip's planted swerves). Also `salience explain` on the `shapes`
classifier: overlays titled with the predicted class and its score.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience_client import SalienceClient, report
from salience_client.overlay import overlay
from salience_client.review import REVIEW_MAPS
from tests.conftest import RunningServer
from tests.e2e.review_clip import (
    CLIP_FRAMES,
    SWERVES,
    driving_clip,
    report_data,
    write_frames,
    write_video,
)

ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]
ROAD = (66, 200)  # the steering model's input, height × width
SCALE = 2  # the PNGs' default panel scale
THRESHOLD = 0.25
MODIFIERS = [name for name, _ in REVIEW_MAPS]


@dataclass
class Clip:
    root: Path
    frames: Path  # a directory of PNGs
    video: Path
    pixels: np.ndarray  # uint8 (24, 66, 200, 3) as written to the PNGs


@pytest.fixture(scope="module")
def served(demo_server: RunningServer) -> RunningServer:
    return demo_server  # the bundled demo models


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    root = tmp_path_factory.mktemp("review-clip")
    images, _ = driving_clip()
    write_frames(root / "frames", images)
    write_video(root / "clip.mp4", images)
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "frames").iterdir())])
    return Clip(root, root / "frames", root / "clip.mp4", pixels)


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[SalienceClient]:
    with served.client() as opened:
        yield opened


def salience(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def review(served: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    done = salience("review", "--target", served.target, "--model", "steering", *args)
    assert done.returncode == 0, f"{done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def floats(pixels: np.ndarray) -> np.ndarray:
    """uint8 frames as the command line feeds a float32 model: values in [0, 1]."""
    return (pixels.astype(np.float32) / np.float32(255)).astype(np.float32)


def predicted(client: SalienceClient, pixels: np.ndarray) -> np.ndarray:
    return client.predict("steering", floats(pixels)).outputs["steering"][:, 0].astype(np.float64)


def jumps(values: np.ndarray, threshold: float) -> list[int]:
    return [k for k in range(1, len(values)) if abs(values[k] - values[k - 1]) > threshold]


def panels(png: Path) -> list[np.ndarray]:
    layout = report.strip_layout(ROAD, 1 + len(MODIFIERS), SCALE)
    with Image.open(png) as image:
        assert image.size == layout.size
        rgb = np.asarray(image.convert("RGB"))
    return [rgb[top:bottom, left:right] for left, top, right, bottom in layout.boxes]


def assert_same_overlay(drawn: np.ndarray, expected: np.ndarray) -> None:
    """Equal but where a map value sits on a colormap entry's edge: a sample's map
    batched with other frames may differ from its unary map in the last float32 bit
    (the device's kernels differ by batch size), which can move a pixel to the
    neighbouring colormap entry (a few levels at alpha 0.5).
    """
    assert drawn.shape == expected.shape
    diff = np.abs(drawn.astype(int) - expected.astype(int))
    assert diff.max() <= 4
    assert np.mean(diff.max(axis=-1) > 0) < 0.01


def test_review_of_png_frames(
    served: RunningServer, clip: Clip, client: SalienceClient, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = review(
        served, str(clip.frames), "--out", str(out), "--jump-threshold", str(THRESHOLD),
        "--video", str(out / "review.mp4"),
    )  # fmt: skip
    names = [f"road_{k:03d}" for k in range(CLIP_FRAMES)]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{n}.png" for n in names]

    # The report's values are the model's, and its jumps where they move.
    values = predicted(client, clip.pixels)
    data = report_data(out / "report.html")
    assert [f["id"] for f in data["frames"]] == names
    np.testing.assert_allclose([f["value"] for f in data["frames"]], values, atol=1e-6)
    np.testing.assert_allclose([f["delta"] for f in data["frames"][1:]], np.diff(values), atol=1e-5)
    assert data["frames"][0]["delta"] is None
    flagged = [k for k, f in enumerate(data["frames"]) if f["jump"]]
    assert flagged == jumps(values, THRESHOLD)
    assert flagged == list(SWERVES)  # the clip's planted swerves, and nothing else
    assert (data["model"], data["version"], data["output"], data["method"]) == (
        "steering", 1, "steering", "vanilla"
    )  # fmt: skip
    listed = ", ".join(f"{names[k]} ({values[k] - values[k - 1]:+.3f})" for k in SWERVES)
    assert f"jumps (|Δ steering| > {THRESHOLD:g}): {listed}" in done.stdout

    # Each PNG: the input, then the overlays of the maps a unary Explain gives.
    for k in (0, SWERVES[0], CLIP_FRAMES - 1):
        unary = client.explain(
            "steering", floats(clip.pixels[k : k + 1]), filter_indices=[0],
            grad_modifiers=MODIFIERS,
        )  # fmt: skip
        drawn = panels(out / f"{names[k]}.png")
        np.testing.assert_array_equal(drawn[0], report.enlarge(clip.pixels[k], SCALE))
        for name, panel in zip(MODIFIERS, drawn[1:], strict=True):
            expected = report.enlarge(overlay(clip.pixels[k], unary.maps[name][0]), SCALE)
            assert_same_overlay(panel, expected)
        # The three maps differ from each other (and from the plain frame).
        for a in range(4):
            for b in range(a + 1, 4):
                assert np.abs(drawn[a].astype(int) - drawn[b].astype(int)).mean() > 2

    # The annotated video: one frame per PNG, the PNG's size (padded to even sides).
    import av

    width, height = report.strip_layout(ROAD, 4, SCALE).size
    with av.open(str(out / "review.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == CLIP_FRAMES
    assert frames[0].shape == (height + height % 2, width + width % 2, 3)
    first = np.asarray(Image.open(out / f"{names[0]}.png").convert("RGB")).astype(int)
    assert np.abs(frames[0][:height, :width].astype(int) - first).mean() < 6  # lossy


def test_review_of_a_video_and_gradcam(
    served: RunningServer, clip: Clip, client: SalienceClient, tmp_path: Path
) -> None:
    import av

    out = tmp_path / "video"
    review(served, str(clip.video), "--out", str(out), "--method", "gradcam", "--scale", "1")
    # The frames as the video decodes them (lossy), which is what the model saw.
    with av.open(str(clip.video)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (CLIP_FRAMES, *ROAD, 3)
    values = predicted(client, decoded)
    data = report_data(out / "report.html")
    names = [f"frame_{k:05d}" for k in range(CLIP_FRAMES)]
    assert [f["id"] for f in data["frames"]] == names
    assert sorted(p.name for p in out.glob("*.png")) == [f"{n}.png" for n in names]
    np.testing.assert_allclose([f["value"] for f in data["frames"]], values, atol=1e-6)
    np.testing.assert_allclose([f["time"] for f in data["frames"]], np.arange(CLIP_FRAMES) / 10)
    assert [k for k, f in enumerate(data["frames"]) if f["jump"]] == jumps(values, 0.25)
    assert data["method"] == "gradcam"
    k = SWERVES[1]
    unary = client.explain(
        "steering", floats(decoded[k : k + 1]), method="gradcam", filter_indices=[0],
        grad_modifiers=MODIFIERS,
    )  # fmt: skip
    layout = report.strip_layout(ROAD, 4, 1)
    with Image.open(out / f"{names[k]}.png") as image:
        assert image.size == layout.size
        rgb = np.asarray(image.convert("RGB"))
    for name, (left, top, right, bottom) in zip(MODIFIERS, layout.boxes[1:], strict=True):
        assert_same_overlay(rgb[top:bottom, left:right], overlay(decoded[k], unary.maps[name][0]))


def test_frames_of_another_size_are_refused_unless_resized(
    served: RunningServer, clip: Clip, client: SalienceClient, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for k in (0, 1, 2):
        Image.fromarray(clip.pixels[k]).resize((100, 33)).save(small / f"s{k}.png")
    done = salience(
        "review", "--target", served.target, "--model", "steering", str(small),
        "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "is 100×33 pixels (width×height), but model 'steering' takes 200×66" in done.stderr
    assert "--resize" in done.stderr
    assert "Traceback" not in done.stderr

    out = tmp_path / "resized"
    review(served, str(small), "--out", str(out), "--resize")
    resized = np.stack(
        [
            np.asarray(Image.open(small / f"s{k}.png").resize((200, 66), Image.Resampling.BILINEAR))
            for k in (0, 1, 2)
        ]
    )
    values = [f["value"] for f in report_data(out / "report.html")["frames"]]
    np.testing.assert_allclose(values, predicted(client, resized), atol=1e-6)

    empty = tmp_path / "empty"
    empty.mkdir()
    done = salience(
        "review", "--target", served.target, "--model", "steering", str(empty),
        "--out", str(tmp_path / "none"),
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{empty} holds no frames: put PNG or JPEG files in it" in done.stderr


def test_explain_titles_classifier_overlays_with_class_and_score(
    served: RunningServer, client: SalienceClient, tmp_path: Path
) -> None:
    from salience_server.demo.data import SHAPE_CLASSES, generate_shapes

    shapes = generate_shapes(2, seed=31)
    pixels = np.round(shapes.images * 255).astype(np.uint8)
    for k in range(2):
        Image.fromarray(pixels[k]).save(tmp_path / f"shape{k}.png")
    images = floats(pixels)
    probs = client.predict("shapes", images).outputs["predictions"].astype(np.float64)
    other = (int(np.argmax(probs[0])) + 1) % len(SHAPE_CLASSES)  # not the first's class
    done = salience(
        "explain", "--target", served.target, "--model", "shapes", "--filter-indices",
        str(other), "--out", "maps", "shape0.png", "shape1.png", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unary = client.explain("shapes", images, filter_indices=[other])
    for k in range(2):
        top = int(np.argmax(probs[k]))
        title = f"{SHAPE_CLASSES[top]} {probs[k, top]:.2f}"
        if top != other:
            title += f" · map: {SHAPE_CLASSES[other]} {probs[k, other]:.2f}"
        rgb = overlay(pixels[k], unary.maps["absolute"][k])
        expected = report.annotated_overlay(rgb, title, "jet")
        with Image.open(tmp_path / "maps" / f"shape{k}_absolute.png") as png:
            drawn = np.asarray(png.convert("RGB"))
        # The title is exactly that text, above the overlay and beside its colour bar.
        assert_same_overlay(drawn, expected)
        assert min(drawn.shape[:2]) >= report.MIN_OVERLAY_SIDE
