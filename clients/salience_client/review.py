"""`salience review`: explain every frame of a drive, for a person to review.

    salience review --model steering clip/ --out review/            # PNG frames, sorted
    salience review --model steering drive.mp4 --out review/ --video review/annotated.mp4

INPUT is a directory of frames (PNG or JPEG, taken in natural name order: frame_2
before frame_10) or a video file (anything FFmpeg reads, through PyAV). Frames are
read as `salience explain` reads images: the model's channel count, values in [0, 1]
for a floating-point input, never resized unless `--resize` is given.

The frames go over one ExplainStream as they are read (the server batches them on
the device and answers in order), with three maps of one objective — the model
output `--output` (default: its first), unit `--filter-index` (default 0), the
same objective `salience explain --filter-indices I --output NAME` explains — from
one backward pass: `none` (what would increase the output: steer right), `negate`
(what would decrease it: steer left) and `small_values` (what it is stable against:
keep straight), by `--method` (vanilla by default; gradcam, or any other).

For each frame DIR gets a PNG: the predicted value on top, then the input and its
three overlays side by side. DIR/report.html (or `--report`) is one self-contained
page: a timeline of the predicted value, thumbnails, and a frame's maps large when
clicked. A frame whose prediction moved by more than `--jump-threshold` since the
previous frame is flagged as a jump. `--video` also writes the PNGs as a video.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import report
from salience_client.inputs import InputSpec, UsageError, image_pixels

# The three maps of a review, from one backward pass, and what each shows.
REVIEW_MAPS = (
    ("none", "increase (right)"),
    ("negate", "decrease (left)"),
    ("small_values", "maintain"),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that hold H.264
DEFAULT_JUMP = 0.25
DEFAULT_FPS = 10.0
THUMBNAIL_HEIGHT = 64
REVIEW_EXTRA_HINT = "install it with: pip install 'salience[review]'"

# Frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRef:
    """A frame as it travels with the stream: its name (its id on the wire), place,
    time in a video, and the pixels its overlays are drawn on.
    """

    name: str
    index: int
    time: float | None
    pixels: np.ndarray  # H×W×3 uint8, at the model's input size

    def __str__(self) -> str:
        return self.name


def natural_key(path: Path) -> list[Any]:
    """Sorts `frame_2` before `frame_10`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"{directory} holds no frames: put PNG or JPEG files in it")
    return sorted(files, key=natural_key)


def _unique_names(stems: Sequence[str]) -> list[str]:
    """File stems with -2, -3... added to repeats (frame.png beside frame.jpg)."""
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


class FrameSource:
    """The frames of INPUT, read one at a time, with their model inputs."""

    def __init__(self, path: Path, spec: InputSpec, resize: bool) -> None:
        self.path = path
        self.spec = spec
        self.resize = resize
        self.fps: float | None = None
        if path.is_dir():
            self.files: list[Path] | None = frame_files(path)
            self.count: int | None = len(self.files)
        elif path.is_file():
            self.files = None
            self.count = self._probe_video()
        else:
            raise UsageError(f"input {path} does not exist")
        if spec.image_mode is None:
            raise UsageError(
                f"model {spec.model!r} input {spec.name!r} takes shape {spec.describe()}, which "
                "is not an image (H×W or H×W×C with C in 1, 3, 4): it cannot review frames"
            )

    def _probe_video(self) -> int | None:
        av = import_av()
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise UsageError(f"{self.path} has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else None
                return int(stream.frames) or None
        except av.error.FFmpegError as err:
            raise UsageError(
                f"{self.path} is neither a directory of frames nor a video FFmpeg can read ({err})"
            ) from None

    def _sample(self, image: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(display pixels, model input sample) of one PIL image."""
        from PIL import Image

        spec = self.spec
        height, width = spec.shape[0], spec.shape[1]
        size = (width or image.width, height or image.height)
        if (image.width, image.height) != size:
            if not self.resize:
                raise UsageError(
                    f"{what} is {image.width}×{image.height} pixels (width×height), but model "
                    f"{spec.model!r} takes {size[0]}×{size[1]}: pass --resize to resize frames"
                )
            image = image.resize(size, Image.Resampling.BILINEAR)
        mode = spec.image_mode
        assert mode is not None  # checked when the source was opened
        pixels = image_pixels(image, mode, spec)
        if len(spec.shape) == 3 and pixels.ndim == 2:
            pixels = pixels[..., np.newaxis]
        shown = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return shown, np.ascontiguousarray(pixels.astype(spec.dtype, copy=False))

    def __iter__(self) -> Iterator[tuple[FrameRef, np.ndarray]]:
        if self.files is not None:
            yield from self._images(self.files)
        else:
            yield from self._video()

    def _images(self, files: list[Path]) -> Iterator[tuple[FrameRef, np.ndarray]]:
        from PIL import Image, UnidentifiedImageError

        names = _unique_names([p.stem for p in files])
        for k, (path, name) in enumerate(zip(files, names, strict=True)):
            try:
                with Image.open(path) as image:
                    image.load()
                    shown, sample = self._sample(image, str(path))
            except UnidentifiedImageError:
                raise UsageError(f"{path} is not an image Pillow can read") from None
            except OSError as err:
                raise UsageError(f"cannot read {path}: {err}") from None
            yield FrameRef(name, k, None, shown), sample

    def _video(self) -> Iterator[tuple[FrameRef, np.ndarray]]:
        av = import_av()
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # decode on several cores
                for k, frame in enumerate(container.decode(stream)):
                    shown, sample = self._sample(frame.to_image(), f"{self.path} frame {k}")
                    time = float(frame.time) if frame.time is not None else None
                    yield FrameRef(f"frame_{k:05d}", k, time, shown), sample
        except av.error.FFmpegError as err:
            raise UsageError(f"cannot decode {self.path}: {err}") from None


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise UsageError(f"reading and writing videos needs PyAV; {REVIEW_EXTRA_HINT}") from None
    return av


# The video --------------------------------------------------------------------------


class VideoWriter:
    """Frames (H×W×3 uint8, all of one size) encoded as H.264 where PyAV's FFmpeg has
    it (every browser plays it), else MPEG-4 Part 2.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = Fraction(fps).limit_denominator(1001)
        self._av = import_av()
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        av = self._av
        # 4:2:0 chroma needs even sides: pad with white rather than crop a pixel off.
        height, width = rgb.shape[:2]
        padded = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), constant_values=255)
        if self._container is None:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            try:
                self._container = av.open(str(self.path), mode="w")
            except (av.error.FFmpegError, ValueError) as err:
                raise UsageError(f"cannot write the video {self.path}: {err}") from None
            stream = self._container.add_stream(codec, rate=self.fps)
            stream.width, stream.height = padded.shape[1], padded.shape[0]
            stream.pix_fmt = "yuv420p"
            self._stream = stream
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except av.error.FFmpegError as err:
            raise UsageError(f"cannot write the video {self.path}: {err}") from None
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode(None):  # flushes the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()
        self._container = None


# The review ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reviewed:
    """One answered frame, as the report needs it."""

    ref: FrameRef
    value: float
    delta: float | None
    jump: bool
    png: Path
    thumbnail: bytes


def output_spec(metadata: pb.ModelMetadata, head: str, unit: int) -> str:
    """The output head reviewed; checks that it has the unit."""
    names = [o.name for o in metadata.outputs]
    name = head or names[0]
    if name not in names:
        raise UsageError(
            f"--output {head!r} is not an output of model {metadata.name!r}: choose one of "
            + ", ".join(repr(n) for n in names)
        )
    spec = next(o for o in metadata.outputs if o.name == name)
    units = int(np.prod([d for d in spec.shape[1:]])) if all(d > 0 for d in spec.shape[1:]) else 0
    if units and unit >= units:
        raise UsageError(
            f"--filter-index {unit} is out of range: output {name!r} has {units} unit"
            + ("s" if units != 1 else "")
        )
    return name


def thumbnail(pixels: np.ndarray) -> bytes:
    """A small JPEG of a frame for the report's strip."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if image.height > THUMBNAIL_HEIGHT:
        width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
        image = image.resize((width, THUMBNAIL_HEIGHT), Image.Resampling.BILINEAR)
    return report.jpeg_bytes(np.asarray(image))


def frame_title(ref: FrameRef, output: str, value: float, delta: float | None, jump: bool) -> str:
    title = f"{ref.name}    {output} {value:+.3f}"
    if delta is not None:
        title += f"    change {delta:+.3f}"  # the built-in font has no Greek
    if jump:
        title += "    JUMP"
    return title


def relative_link(path: Path, start: Path) -> str:
    """`path` relative to `start` (with `..` where needed, so it also works as a link)."""
    return os.path.relpath(path.resolve(), start.resolve())
