"""A short driving clip for `salience review`, made with the steering demo's data
generator (`salience_server.demo.data.generate_roads`, no TensorFlow).

The generator draws independent scenes, so a clip is assembled from a pool of them:
frame k is the unused scene whose true steering angle is nearest the clip's planned
angle at k. The plan is three gentle bends joined by two sudden swerves, at frames
`SWERVES`, where the prediction jumps and the review must flag it.

    python -m tests.e2e.review_clip DIR   # DIR/frames/road_000.png ... and DIR/clip.mp4

The frames need only Pillow; the video needs PyAV (`pip install 'salience[review]'`,
which `make serve` does not install). Without it the frames are written, and the
command says how to install PyAV for the video instead of failing.

`report_data` reads back what a review's HTML report embeds.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

CLIP_FRAMES = 24
SWERVES = (8, 16)
POOL = 150
SEED = 2024


def planned_angles(n: int = CLIP_FRAMES) -> np.ndarray:
    """Right bend easing in, a swerve to a left bend, a swerve back to a right one."""
    k = np.arange(n, dtype=np.float64)
    first, second = SWERVES
    return np.where(
        k < first,
        0.05 + 0.04 * k,
        np.where(k < second, -0.6 + 0.04 * (k - first), 0.1 + 0.03 * (k - second)),
    )


def driving_clip(n: int = CLIP_FRAMES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(frames float32 (n, 66, 200, 3) in [0, 1], their true steering angles)."""
    from salience_server.demo.data import generate_roads

    pool = generate_roads(max(POOL, 3 * n), seed)
    free = np.ones(len(pool), dtype=bool)
    picked = []
    for angle in planned_angles(n):
        distance = np.where(free, np.abs(pool.angles - angle), np.inf)
        k = int(np.argmin(distance))
        free[k] = False
        picked.append(k)
    return pool.images[picked], pool.angles[picked]


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_frames(directory: Path, images: np.ndarray) -> list[Path]:
    """`road_000.png`, ... (8-bit, as a camera would store them)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, pixels in enumerate(to_uint8(images)):
        path = directory / f"road_{k:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class NoPyAV(RuntimeError):
    """PyAV is not installed, so no video can be written."""


def import_av() -> Any:
    """PyAV, or NoPyAV saying how to install it (as `salience review` does)."""
    from salience_client.review import REVIEW_EXTRA_HINT

    try:
        import av
    except ImportError:
        raise NoPyAV(f"writing the clip's video needs PyAV; {REVIEW_EXTRA_HINT}") from None
    return av


def write_video(path: Path, images: np.ndarray, fps: int = 10) -> Path:
    """The frames as an H.264 MP4 (lossy, as dashcam footage is)."""
    av = import_av()

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = images.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in to_uint8(images):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def report_data(path: Path) -> dict[str, Any]:
    """The frames and figures a review's report embeds (its JSON data block)."""
    text = path.read_text(encoding="utf-8")
    found = re.search(
        r'<script type="application/json" id="review-data">(.*?)</script>', text, re.S
    )
    assert found is not None, f"{path} has no data block"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path("review-clip")
    images, _ = driving_clip()
    write_frames(root / "frames", images)
    print(root / "frames")
    try:
        write_video(root / "clip.mp4", images)
    except NoPyAV as err:
        print(f"{root / 'clip.mp4'} not written: {err}", file=sys.stderr)
    else:
        print(root / "clip.mp4")


if __name__ == "__main__":
    main(sys.argv[1:])
