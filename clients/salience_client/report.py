"""Pictures and pages for people: titled overlays, one-frame strips of maps, and the
single-file HTML report of `salience review`.

    strip = frame_strip([("input", image), ("increase", a), ("decrease", b)], "frame 7")
    write_report("out/report.html", ReportInfo(...), frames)

Text is drawn with Pillow's built-in font (no font file to find), pictures are
composed as uint8 RGB arrays, and the report embeds every image as a data URI, so
the one HTML file works offline, moved or mailed, with nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
JUMP_INK = (200, 30, 30)
TITLE_PX = 14
LABEL_PX = 12
MARGIN = 6
GAP = 6
# Small inputs (64×64) are drawn larger, so a title fits above them and is readable.
MIN_TITLED_WIDTH = 192


def font(size: int) -> Any:
    """Pillow's built-in font at `size` px (its fixed bitmap font where FreeType is
    missing, which ignores the size).
    """
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _text_height(size: int) -> int:
    """Pixels of a text line: its ascender and descender with a little air."""
    bottom = font(size).getbbox("Ag|")[3]
    return int(bottom) + 4


def text_width(text: str, size: int) -> int:
    return math.ceil(font(size).getbbox(text)[2])


def enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    """An image `scale` times larger, each pixel a block (nothing is invented)."""
    if scale <= 1:
        return rgb
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def titled(rgb: np.ndarray, title: str, *, min_width: int = MIN_TITLED_WIDTH) -> np.ndarray:
    """`rgb` (H×W×3 uint8) under a title bar; enlarged by a whole factor to at least
    `min_width` pixels wide first (and as wide as the title), so that a small image
    keeps a readable title.
    """
    width = rgb.shape[1]
    wanted = max(min_width, text_width(title, TITLE_PX) + 8)
    scale = max(1, math.ceil(wanted / width))
    image = enlarge(rgb, scale)
    bar = _text_height(TITLE_PX) + 4
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + bar), BACKGROUND)
    canvas.paste(Image.fromarray(image), (0, bar))
    ImageDraw.Draw(canvas).text((4, 2), title, fill=INK, font=font(TITLE_PX))
    return np.asarray(canvas)


# `salience explain`'s overlays: the smaller side drawn at least this large, and a
# colour bar this wide beside the map.
MIN_OVERLAY_SIDE = 192
COLORBAR_PX = 14


@dataclass(frozen=True)
class OverlayLayout:
    """Where an annotated overlay's parts lie: (left, top, right, bottom) in pixels."""

    size: tuple[int, int]  # width, height
    image: tuple[int, int, int, int]
    colorbar: tuple[int, int, int, int]
    scale: int


def overlay_layout(
    shape: tuple[int, int], title: str, *, min_side: int = MIN_OVERLAY_SIDE
) -> OverlayLayout:
    """The layout of `annotated_overlay` for an overlay of `shape` (height, width)."""
    height, width = shape
    scale = max(1, math.ceil(min_side / max(1, min(height, width))))
    h, w = height * scale, width * scale
    top = MARGIN + _text_height(TITLE_PX) + GAP
    image = (MARGIN, top, MARGIN + w, top + h)
    bar_left = image[2] + GAP
    colorbar = (bar_left, top, bar_left + COLORBAR_PX, top + h)
    labels = max(text_width(t, LABEL_PX) for t in ("high", "low"))
    right = max(colorbar[2] + 4 + labels, MARGIN + text_width(title, TITLE_PX)) + MARGIN
    return OverlayLayout((right, top + h + MARGIN), image, colorbar, scale)


def colorbar_colours(height: int, colormap: str) -> np.ndarray:
    """`height` colours of a colormap, its top (1) first and its bottom (0) last."""
    from salience_client.overlay import colorize

    values = np.linspace(1.0, 0.0, height)[:, np.newaxis]
    return colorize(values, colormap)[:, 0, :]


def annotated_overlay(
    rgb: np.ndarray, title: str, colormap: str, *, min_side: int = MIN_OVERLAY_SIDE
) -> np.ndarray:
    """An overlay (H×W×3 uint8) legible at a glance: enlarged by a whole factor until
    its smaller side is at least `min_side` pixels (each pixel a block), under
    `title` (the predicted value or class), beside a colour bar of `colormap` from
    high saliency (top) to low (bottom).
    """
    layout = overlay_layout(rgb.shape[:2], title, min_side=min_side)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    canvas.paste(Image.fromarray(enlarge(rgb, layout.scale)), layout.image[:2])
    left, top, right, bottom = layout.colorbar
    bar = np.repeat(colorbar_colours(bottom - top, colormap)[:, np.newaxis], right - left, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font(TITLE_PX))
    draw.text((right + 4, top), "high", fill=INK, font=font(LABEL_PX))
    low_top = bottom - _text_height(LABEL_PX)
    draw.text((right + 4, low_top), "low", fill=INK, font=font(LABEL_PX))
    return np.asarray(canvas)


@dataclass(frozen=True)
class StripLayout:
    """Where a strip's panels lie: boxes (left, top, right, bottom) in pixels."""

    size: tuple[int, int]  # width, height
    boxes: list[tuple[int, int, int, int]]


def strip_layout(panel: tuple[int, int], count: int, scale: int) -> StripLayout:
    """The layout of `count` panels of `panel` (height, width) pixels drawn `scale`×:
    a title line, then per panel a label line above the image, side by side.
    """
    height, width = panel[0] * scale, panel[1] * scale
    title = _text_height(TITLE_PX)
    label = _text_height(LABEL_PX)
    top = MARGIN + title + GAP + label
    boxes = [
        (MARGIN + k * (width + GAP), top, MARGIN + k * (width + GAP) + width, top + height)
        for k in range(count)
    ]
    size = (2 * MARGIN + count * width + (count - 1) * GAP, top + height + MARGIN)
    return StripLayout(size, boxes)


def frame_strip(
    panels: Sequence[tuple[str, np.ndarray]],
    title: str,
    *,
    scale: int = 1,
    alert: bool = False,
) -> np.ndarray:
    """One picture of a frame: `title` on top, then each (label, H×W×3 uint8) panel,
    `scale`× larger, side by side under its label. `alert` draws the title in red.
    """
    first = panels[0][1]
    layout = strip_layout(first.shape[:2], len(panels), scale)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=JUMP_INK if alert else INK, font=font(TITLE_PX))
    label_top = MARGIN + _text_height(TITLE_PX) + GAP
    for (label, rgb), box in zip(panels, layout.boxes, strict=True):
        if rgb.shape != first.shape:
            raise ValueError(f"panel {label!r} is {rgb.shape}, the first {first.shape}")
        draw.text((box[0], label_top), label, fill=INK, font=font(LABEL_PX))
        canvas.paste(Image.fromarray(enlarge(rgb, scale)), box[:2])
    return np.asarray(canvas)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# Class titles of `salience explain` ---------------------------------------------------


def class_title(
    scores: np.ndarray, labels: Sequence[str], predicted: str = "", explained: int | None = None
) -> str:
    """`triangle 0.97` for one sample's scores of a labelled output: the predicted
    class (the server's label when given, else the arg-max) and its score; when the
    map explains another class, `· map: square 0.01` names that one too.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    top = int(np.argmax(values))
    name = predicted or (labels[top] if top < len(labels) else str(top))
    title = f"{name} {values[top]:.2f}"
    if explained is not None and explained != top and 0 <= explained < len(values):
        other = labels[explained] if explained < len(labels) else str(explained)
        title += f" · map: {other} {values[explained]:.2f}"
    return title


def class_titles(
    metadata: Any,
    outputs: dict[str, np.ndarray],
    labels: Sequence[str],
    *,
    output: str = "",
    filter_indices: Sequence[int] = (),
) -> list[str] | None:
    """Per sample, the `class_title` of a model that names its classes (its metadata's
    labelled output); None for one that names none. The map's class is known when
    the objective is one unit (`filter_indices`) of that output (`output`, "" for the
    model's first).
    """
    spec = next((o for o in metadata.outputs if o.labels), None)
    if spec is None or spec.name not in outputs:
        return None
    head = output or (metadata.outputs[0].name if metadata.outputs else "")
    explained = filter_indices[0] if len(filter_indices) == 1 and head == spec.name else None
    scores = np.asarray(outputs[spec.name])
    return [
        class_title(scores[k], list(spec.labels), labels[k] if k < len(labels) else "", explained)
        for k in range(len(scores))
    ]


def value_titles(
    outputs: dict[str, np.ndarray], *, output: str = "", filter_indices: Sequence[int] = ()
) -> list[str]:
    """Per sample, the predicted value of a model that names no classes: `steering
    -0.576` for an output of one unit; `logits[3] 1.234 · argmax 1 2.345` for the
    unit the map explains (one of `filter_indices` of `output`, "" for the first) and
    the largest; `logits argmax 1 2.345` when the map explains no single unit.
    """
    head = output if output in outputs else next(iter(outputs))
    scores = np.asarray(outputs[head], dtype=np.float64)
    explained = filter_indices[0] if len(filter_indices) == 1 else None
    titles = []
    for k in range(len(scores)):
        values = scores[k].reshape(-1)
        if values.size == 1:
            titles.append(f"{head} {values[0]:+.3f}")
            continue
        top = int(np.argmax(values))
        largest = f"argmax {top} {values[top]:.3f}"
        if explained is not None and 0 <= explained < values.size:
            title = f"{head}[{explained}] {values[explained]:.3f}"
            titles.append(title if explained == top else f"{title} · {largest}")
        else:
            titles.append(f"{head} {largest}")
    return titles


# The review report ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFrame:
    """One frame as the report shows it."""

    frame_id: str
    value: float  # the predicted output
    delta: float | None  # value - previous value; None for the first frame
    jump: bool  # |delta| above the threshold
    strip_png: bytes  # the frame's strip, shown large
    thumbnail_jpeg: bytes  # the input frame, small
    file: str = ""  # the strip's PNG, relative to the report (for the reader's reference)
    time: float | None = None  # seconds into a video


@dataclass(frozen=True)
class ReportInfo:
    """What the report's header says."""

    title: str
    model: str
    version: int
    output: str  # the name of the plotted value
    method: str
    threshold: float
    source: str
    panels: Sequence[str] = field(default_factory=tuple)


_TEMPLATE = "report_template.html"
TIMELINE_SIZE = (960, 200)  # the SVG's viewBox (it scales to the page width)
_PLOT = (56, 12, 16, 28)  # left, top, right, bottom margins of the plot inside it


def _scale(low: float, high: float) -> tuple[float, float]:
    """A y range for the values: their span with some air, never empty, 0 included
    when it is near (so "left" and "right" of a steering angle are seen at a glance).
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return -1.0, 1.0
    if low > 0 and low < 0.5 * high:
        low = 0.0
    if high < 0 and high > 0.5 * low:
        high = 0.0
    span = high - low
    pad = 0.08 * span if span > 0 else max(abs(high), 1.0) * 0.1
    return low - pad, high + pad


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (multiples of 1, 2 or 5 × 10^k) inside [low, high]."""
    span = high - low
    if not (span > 0 and math.isfinite(span)):
        return [low]
    raw = span / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    k = 0
    while first + k * step <= high + 1e-12 * span:
        value = first + k * step
        ticks.append(0.0 if abs(value) < 1e-9 * step else value)
        k += 1
    return ticks


def timeline_svg(frames: Sequence[ReportFrame], info: ReportInfo) -> str:
    """The predicted value per frame as an inline SVG: a line through every frame, a
    dot per frame (clickable), jumps in red with a dashed marker, a zero line.
    """
    width, height = TIMELINE_SIZE
    left, top, right, bottom = _PLOT
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [f.value for f in frames]
    finite = [v for v in values if math.isfinite(v)]
    low, high = _scale(min(finite, default=-1.0), max(finite, default=1.0))
    count = len(frames)

    def x(k: int) -> float:
        return left + (plot_w * k / (count - 1) if count > 1 else plot_w / 2)

    def y(v: float) -> float:
        v = v if math.isfinite(v) else low
        return top + plot_h * (high - v) / (high - low)

    parts = [
        f'<svg id="timeline-svg" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
        f'{height}" role="img" aria-label="{html.escape(info.output)} per frame">',
        f'<rect class="plot" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for v in nice_ticks(low, high):
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" '
            f'text-anchor="end">{v:+.3g}</text>'
        )
    if low < 0 < high:
        parts.append(
            f'<line class="zero" x1="{left}" x2="{left + plot_w}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>'
        )
    step = max(1, math.ceil(count / 12))
    for k in range(0, count, step):
        parts.append(
            f'<text class="tick" x="{x(k):.1f}" y="{height - 10}" text-anchor="middle">{k}</text>'
        )
    for k, frame in enumerate(frames):
        if frame.jump:
            parts.append(
                f'<line class="jump-mark" x1="{x(k):.1f}" x2="{x(k):.1f}" y1="{top}" '
                f'y2="{top + plot_h}"/>'
            )
    points = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in enumerate(values))
    parts.append(f'<polyline class="series" points="{points}"/>')
    parts.append(
        f'<line id="cursor" x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{top}" y2="{top + plot_h}"/>'
    )
    for k, frame in enumerate(frames):
        kind = "dot jump" if frame.jump else "dot"
        tip = html.escape(f"{frame.frame_id}: {info.output} {frame.value:+.4f}")
        parts.append(
            f'<circle class="{kind}" data-index="{k}" cx="{x(k):.1f}" cy="{y(frame.value):.1f}" '
            f'r="{5 if frame.jump else 3.5}"><title>{tip}</title></circle>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _thumbnails(frames: Sequence[ReportFrame]) -> str:
    items = []
    for k, frame in enumerate(frames):
        kind = "thumb jump" if frame.jump else "thumb"
        name = html.escape(frame.frame_id)
        items.append(
            f'<button type="button" class="{kind}" data-index="{k}" title="{name}">'
            f'<img src="{data_uri(frame.thumbnail_jpeg, "image/jpeg")}" alt="{name}">'
            f"<span>{frame.value:+.3f}</span></button>"
        )
    return "\n".join(items)


def _json_for_script(value: Any) -> str:
    """JSON safe inside a <script> element: no `<` at all, so no `</script>` ends it
    early and no `<!--` changes how the browser reads it (JSON.parse reads the
    escapes back).
    """
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(
    info: ReportInfo, frames: Sequence[ReportFrame], *, link_strips: bool = False
) -> str:
    """The report as one HTML document (see `write_report`)."""
    if not frames:
        raise ValueError("a report needs at least one frame")
    if link_strips and not all(f.file for f in frames):
        raise ValueError("linked strips need each frame's file")

    def strip(frame: ReportFrame) -> str:
        # A relative URL of the PNG beside the report, or the PNG itself.
        if link_strips:
            return quote(Path(frame.file).as_posix())
        return data_uri(frame.strip_png, "image/png")

    jumps = [f for f in frames if f.jump]
    data = {
        "model": info.model,
        "version": info.version,
        "output": info.output,
        "method": info.method,
        "threshold": info.threshold,
        "frames": [
            {
                "id": f.frame_id,
                "index": k,
                "value": f.value,
                "delta": f.delta,
                "jump": f.jump,
                "file": f.file,
                "time": f.time,
                "strip": strip(f),
            }
            for k, f in enumerate(frames)
        ],
    }
    template = Template(resources.files("salience_client").joinpath(_TEMPLATE).read_text("utf-8"))
    first = frames[0]
    summary = (
        f"model {info.model} version {info.version} · method {info.method} · "
        f"{len(frames)} frames · {len(jumps)} jump{'s' if len(jumps) != 1 else ''} "
        f"(|Δ {info.output}| > {info.threshold:g})"
    )
    return template.substitute(
        title=html.escape(info.title),
        source=html.escape(info.source),
        summary=html.escape(summary),
        output=html.escape(info.output),
        panels=html.escape(" | ".join(info.panels)),
        timeline=timeline_svg(frames, info),
        thumbnails=_thumbnails(frames),
        first_id=html.escape(first.frame_id),
        first_strip=html.escape(strip(first)),
        data=_json_for_script(data),
    )


def write_report(
    path: str | PathLike[str],
    info: ReportInfo,
    frames: Sequence[ReportFrame],
    *,
    link_strips: bool = False,
) -> Path:
    """Writes the HTML report: a timeline of the predicted value (inline SVG) with
    jumps flagged, a thumbnail strip, and the selected frame's maps large (click a
    thumbnail or a dot; ← → step through frames, J to the next jump).

    Self-contained by default: every image is embedded. With `link_strips` the large
    strips are each frame's `file` (relative to the report) instead, so the report of
    a long clip stays small, and works as long as it stays beside those files.
    """
    target = Path(path)
    target.write_text(render_report(info, frames, link_strips=link_strips), encoding="utf-8")
    return target
