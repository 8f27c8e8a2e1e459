"""`salience review`: explain every frame of a drive (the work is `salience_client.review`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from salience_client import report, review
from salience_client.cli.options import (
    EXIT_OK,
    UsageError,
    open_client,
    parse_alpha,
    parse_count,
    parse_layer,
    parse_non_negative,
    parse_positive,
    parse_version,
)
from salience_client.inputs import InputSpec


def parse_fps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames per second") from None
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise argparse.ArgumentTypeError(
            f"{text} frames per second is not allowed: use 0 < FPS ≤ 1000"
        )
    return value


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `review` to the `salience` subcommands."""
    parser = commands.add_parser(
        "review",
        parents=[connection],
        help="explain every frame of a clip: overlay PNGs, an HTML report, a video",
        description=(review.__doc__ or "").split("\n\n", 2)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="model name")
    parser.add_argument(
        "--version", type=parse_version, default=0, metavar="V", help="model version"
    )
    parser.add_argument(
        "input", type=Path, metavar="INPUT", help="a directory of PNG/JPEG frames, or a video"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where the PNGs and report go"
    )
    parser.add_argument(
        "--method",
        default="vanilla",
        metavar="NAME",
        help="vanilla (default), gradcam, or another method the model supports",
    )
    parser.add_argument(
        "--output",
        dest="output_head",
        default="",
        metavar="NAME",
        help="the model output whose value is plotted and explained (default: the first)",
    )
    parser.add_argument(
        "--filter-index",
        "--filter-indices",  # the spelling of `salience explain`, for one index
        dest="filter_index",
        type=parse_count,
        default=0,
        metavar="I",
        help="the unit of that output (default 0: a steering angle's only one)",
    )
    parser.add_argument(
        "--penultimate-layer",
        type=parse_layer,
        metavar="L",
        help="Grad-CAM layer (default: the last layer with spatial extent above 1x1)",
    )
    parser.add_argument(
        "--jump-threshold",
        type=parse_non_negative,
        default=review.DEFAULT_JUMP,
        metavar="D",
        help=f"flag frames whose value moved by more than D from the previous one "
        f"(default {review.DEFAULT_JUMP:g})",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help="where the HTML report goes (default: DIR/report.html)",
    )
    parser.add_argument(
        "--link-strips",
        action="store_true",
        help="link the frames' PNGs in DIR from the report instead of embedding them: a "
        "small report for a long clip (about 190 KB less per frame), valid while it stays "
        "beside DIR",
    )
    parser.add_argument(
        "--video", type=Path, metavar="FILE.mp4", help="also write the frames' PNGs as a video"
    )
    parser.add_argument(
        "--fps",
        type=parse_fps,
        metavar="FPS",
        help=f"frame rate of --video (default: the input video's, else {review.DEFAULT_FPS:g})",
    )
    parser.add_argument(
        "--resize",
        action="store_true",
        help="resize frames to the model's input size (bilinear) instead of refusing them",
    )
    parser.add_argument(
        "--scale",
        type=parse_positive,
        default=2,
        metavar="N",
        help="draw the PNGs' panels N times the input size (default 2)",
    )
    parser.add_argument(
        "--colormap", default="jet", metavar="NAME", help="matplotlib colormap of overlays"
    )
    parser.add_argument(
        "--alpha",
        type=parse_alpha,
        default=0.5,
        metavar="A",
        help="weight of the map in overlays, in [0, 1] (default 0.5)",
    )
    parser.add_argument(
        "--window",
        type=parse_count,
        default=0,
        metavar="N",
        help="samples the server keeps in flight for the stream (default 0: its largest)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from salience_client.overlay import get_colormap, overlay

    try:
        get_colormap(args.colormap)
    except ValueError as err:
        raise UsageError(f"--colormap: {err}") from None
    report_path: Path = args.report or args.out / "report.html"
    if report_path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--report {report_path} must name an .html file")
    if args.video is not None:
        if args.video.suffix.lower() not in review.VIDEO_SUFFIXES:
            raise UsageError(
                f"--video {args.video} must name a {', '.join(review.VIDEO_SUFFIXES)} file (H.264)"
            )
        review.import_av()
    for directory in {args.out, report_path.parent, *([args.video.parent] if args.video else [])}:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"cannot create directory {directory}: {err.strerror or err}"
            ) from None

    options: dict[str, Any] = {
        "method": args.method,
        "filter_indices": [args.filter_index],
        "grad_modifiers": [name for name, _ in review.REVIEW_MAPS],
        "output": args.output_head,
        "penultimate_layer": args.penultimate_layer,
    }
    reviewed: list[review.Reviewed] = []
    video: review.VideoWriter | None = None
    version = args.version
    with open_client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
        spec = InputSpec.from_metadata(metadata)
        output = review.output_spec(metadata, args.output_head, args.filter_index)
        source = review.FrameSource(args.input, spec, args.resize)
        if args.video is not None:
            video = review.VideoWriter(args.video, args.fps or source.fps or review.DEFAULT_FPS)
        answers = client.explain_stream(
            args.model, source, version=args.version, window=args.window, **options
        )
        bar = tqdm(total=source.count, unit="frame", disable=None, file=sys.stderr, leave=False)
        previous: float | None = None
        try:
            for ref, result in answers:
                version = result.model_version
                value = float(np.asarray(result.outputs[output])[0].reshape(-1)[args.filter_index])
                delta = None if previous is None else value - previous
                jump = delta is not None and abs(delta) > args.jump_threshold
                previous = value
                panels = [("input", ref.pixels)] + [
                    (
                        f"{label} · {name}",
                        overlay(
                            ref.pixels,
                            result.maps[name][0],
                            colormap=args.colormap,
                            alpha=args.alpha,
                        ),
                    )
                    for name, label in review.REVIEW_MAPS
                ]
                strip = report.frame_strip(
                    panels,
                    review.frame_title(ref, output, value, delta, jump),
                    scale=args.scale,
                    alert=jump,
                )
                png = args.out / f"{ref.name}.png"
                try:
                    png.write_bytes(report.png_bytes(strip))
                except OSError as err:
                    raise UsageError(f"cannot write {png}: {err.strerror or err}") from None
                if video is not None:
                    video.add(strip)
                reviewed.append(
                    review.Reviewed(ref, value, delta, jump, png, review.thumbnail(ref.pixels))
                )
                bar.update(1)
        finally:
            answers.close()
            bar.close()
            if video is not None:
                video.close()
    if not reviewed:
        raise UsageError(f"{args.input} has no frames")
    info = report.ReportInfo(
        title=f"salience review: {args.model} on {args.input.name}",
        model=args.model,
        version=version,
        output=output,
        method=args.method,
        threshold=args.jump_threshold,
        source=str(args.input),
        panels=["input", *(f"{label} ({name})" for name, label in review.REVIEW_MAPS)],
    )
    frames = [
        report.ReportFrame(
            frame_id=r.ref.name,
            value=r.value,
            delta=r.delta,
            jump=r.jump,
            # Linked strips are not read back: the report only names their files.
            strip_png=b"" if args.link_strips else r.png.read_bytes(),
            thumbnail_jpeg=r.thumbnail,
            file=review.relative_link(r.png, report_path.parent),
            time=r.ref.time,
        )
        for r in reviewed
    ]
    report.write_report(report_path, info, frames, link_strips=args.link_strips)
    jumps = [r for r in reviewed if r.jump]
    print(
        f"reviewed {len(reviewed)} frames of {args.input} with {args.model} version {version} "
        f"({args.method})"
    )
    print(f"frames: {args.out} ({len(reviewed)} PNGs)")
    print(f"report: {report_path}")
    if video is not None:
        print(f"video: {args.video} ({video.frames} frames)")
    listed = ", ".join(f"{r.ref.name} ({r.delta:+.3f})" for r in jumps if r.delta is not None)
    print(f"jumps (|Δ {output}| > {args.jump_threshold:g}): {listed or 'none'}")
    return EXIT_OK
