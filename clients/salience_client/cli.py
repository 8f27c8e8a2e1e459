"""The `salience` command line: serve models, list them, predict and explain from files.

    salience serve --model-repository models/ --port 50051
    salience models --target localhost:50051 --json
    salience predict --model shapes --out predictions.npz cat.png dog.png
    salience explain --model shapes --filter-indices 2 --grad-modifier relu --out maps/ cat.png
    salience bench --model shapes --rpc explain --concurrency 32 --duration 20
    salience review --model steering --out review/ clip/        # or a video file

An INPUT is a `.npy` file (one sample, or a batch with the batch axis first) or an
image Pillow can read. The model's metadata says how to read it: a `.npy` sample
gets a batch axis, floating-point values are cast to the model's float dtype, and
images become float values in [0, 1] with the model's channel count. Images are
never resized: a size mismatch is an error naming both sizes.

Exit status: 0 on success, 1 when the server answers with an error (or cannot be
reached), 2 for a usage error (bad option, unreadable input, output that cannot be
written). User errors print one message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.channel import TLS, ChannelConfig
from salience_client.client import (
    DEFAULT_TIMEOUT_SECONDS,
    Explanation,
    Objective,
    SalienceClient,
    SalienceError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

TARGET_ENV = "SALIENCE_TARGET"
TOKEN_ENV = "SALIENCE_TOKEN"
DEFAULT_TARGET = "localhost:50051"
OUTPUT_DTYPES = ("float32", "float16", "uint8")
# Pillow modes by the channel count of a model's image input.
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
OBJECTIVE_FORMAT = "LAYER:I[,I...][:WEIGHT]"
DEFAULT_BENCH_SECONDS = 10.0
# Class labels `salience models` prints per output before shortening the list.
LABELS_SHOWN = 8


class UsageError(Exception):
    """A bad option, input file or output path: reported in one line, exit status 2."""


# Option values ------------------------------------------------------------------


def parse_layer(text: str) -> str | int:
    """A layer reference: an integer index when the text parses as one, else a name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a layer is a name or an integer index, not empty")
    try:
        return int(text)
    except ValueError:
        return text


def parse_indices(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers: "2" or "1,4,7"."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (such as 2 or 1,4,7)"
        ) from None


def parse_objective(text: str) -> Objective:
    """`LAYER:I[,I...][:WEIGHT]` as an Objective.

    Empty indices mean the layer mean, an empty LAYER the model's output layer, and
    WEIGHT (default 1) may be negative.
    """
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"{text!r} is malformed: use {OBJECTIVE_FORMAT}, such as predictions:2, "
            "predictions:2:-1 or conv1: (the layer mean)"
        )
    layer = parse_layer(parts[0]) if parts[0] else None
    try:
        indices = parse_indices(parts[1]) if parts[1].strip() else ()
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} has indices {parts[1]!r}, which are not a comma-separated list of "
            f"integers: use {OBJECTIVE_FORMAT}, such as predictions:1,3"
        ) from None
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} has weight {parts[2]!r}, which is not a number: use {OBJECTIVE_FORMAT}"
            ) from None
        if not math.isfinite(weight):
            raise argparse.ArgumentTypeError(
                f"{text!r} has weight {parts[2]!r}: use a finite number"
            )
    return Objective(layer=layer, filter_indices=indices, weight=weight)


def parse_names(text: str) -> list[str]:
    """A comma-separated list of names: "absolute,relu"."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of names (such as absolute,relu)"
        )
    return names


def parse_count(text: str) -> int:
    """A non-negative integer (samples, steps, seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: use 0 or more")
    return value


def parse_non_negative(text: str) -> float:
    """A finite number >= 0 (SmoothGrad's noise level, review's jump threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: use a finite value >= 0")
    return value


def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def parse_positive(text: str) -> int:
    """An integer of at least 1 (concurrency, requests, batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: use 1 or more")
    return value


def parse_version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model version: use a positive integer (0 means the highest)"
        )
    return value


def parse_alpha(text: str) -> float:
    from salience_client.overlay import check_alpha

    try:
        return check_alpha(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# The parser ---------------------------------------------------------------------


def explanation_parser() -> argparse.ArgumentParser:
    """The explanation options shared by `explain` and `bench`."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--layer", type=parse_layer, metavar="L", help="layer name or index (default: output)"
    )
    options.add_argument(
        "--filter-indices",
        type=parse_indices,
        metavar="I[,I...]",
        help="units or channels of the layer to explain (default: the layer mean)",
    )
    options.add_argument(
        "--objective",
        dest="objectives",
        type=parse_objective,
        action="append",
        metavar=OBJECTIVE_FORMAT,
        help="a weighted term of the explained score; repeat to sum several "
        "(not with --layer/--filter-indices)",
    )
    options.add_argument(
        "--grad-modifier",
        dest="grad_modifiers",
        type=parse_names,
        action="append",
        metavar="M[,M...]",
        help="absolute (default), none, negate, relu, invert, small_values; one map each",
    )
    options.add_argument(
        "--method",
        default="",
        metavar="NAME",
        help="vanilla (default), gradcam, gradcam++, guided-gradcam, smoothgrad, "
        "integrated-gradients, gradient-x-input, blur-ig, guided-ig, xrai",
    )
    options.add_argument(
        "--backprop-modifier",
        default="",
        metavar="NAME",
        help="guided or rectified (alias deconv, relu): how gradients pass through ReLUs",
    )
    options.add_argument(
        "--wrt",
        type=parse_layer,
        metavar="LAYER",
        help="take the gradient with respect to this layer's output instead of the input",
    )
    options.add_argument(
        "--penultimate-layer",
        type=parse_layer,
        metavar="L",
        help="Grad-CAM layer (default: the last layer with spatial extent above 1x1)",
    )
    options.add_argument(
        "--samples", type=parse_count, default=0, metavar="N", help="SmoothGrad copies (16)"
    )
    options.add_argument(
        "--noise",
        type=parse_non_negative,
        metavar="S",
        help="SmoothGrad noise std as a fraction of each sample's range (0.15)",
    )
    options.add_argument(
        "--steps", type=parse_count, default=0, metavar="N", help="Integrated Gradients steps (64)"
    )
    options.add_argument(
        "--seed", type=parse_count, metavar="N", help="seed of SmoothGrad's noise (echoed)"
    )
    options.add_argument(
        "--input-name", default="", metavar="NAME", help="the input the maps are for"
    )
    options.add_argument(
        "--output",
        dest="output_head",
        default="",
        metavar="NAME",
        help="the output head objectives without a layer refer to",
    )
    options.add_argument("--keepdims", action="store_true", help="keep the channel axis")
    options.add_argument(
        "--no-normalize", action="store_true", help="raw maps instead of [0, 1) per sample"
    )
    options.add_argument(
        "--keep-activation",
        action="store_true",
        help="score a softmax/sigmoid layer's output instead of its logits",
    )
    options.add_argument(
        "--output-dtype", choices=OUTPUT_DTYPES, default="float32", help="element type of maps"
    )
    add_path_method_options(options)
    return options


# Blur IG's, Guided IG's and XRAI's own options: unset means the server's default
# (the README's option table); the server checks their ranges.
PATH_METHOD_OPTIONS: tuple[tuple[str, Any, str, str], ...] = (
    ("blur_max_sigma", parse_non_negative, "S", "Blur IG: largest blur sigma in pixels (50)"),
    ("blur_grad_step", parse_non_negative, "H", "Blur IG: sigma step of d blur/d sigma (0.01)"),
    ("guided_fraction", parse_non_negative, "F", "Guided IG: features moved per step (0.25)"),
    ("guided_max_dist", parse_non_negative, "D", "Guided IG: largest lead off the line (0.02)"),
    ("xrai_sigma", parse_non_negative, "S", "XRAI: Felzenszwalb's smoothing sigma (0.8)"),
    ("xrai_min_size", parse_count, "N", "XRAI: smallest segment in pixels (150)"),
    ("xrai_dilation_radius", parse_count, "R", "XRAI: segment dilation radius (5)"),
    ("xrai_area_threshold", parse_non_negative, "A", "XRAI: area ranked, a fraction (1)"),
)


def parse_scales(text: str) -> tuple[float, ...]:
    """XRAI's segmentation scales: comma-separated numbers > 0."""
    try:
        return tuple(parse_non_negative(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers (such as 50,100,150)"
        ) from None


def add_path_method_options(options: argparse.ArgumentParser) -> None:
    for name, parse, metavar, help_text in PATH_METHOD_OPTIONS:
        flag = "--" + name.replace("_", "-")
        options.add_argument(flag, type=parse, metavar=metavar, help=help_text)
    options.add_argument(
        "--xrai-scales",
        type=parse_scales,
        default=(),
        metavar="S[,S...]",
        help="XRAI: Felzenszwalb's scales, one segmentation each (50,100,150,250,500,1200)",
    )


def path_method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The path methods' keyword arguments of `SalienceClient.explain`."""
    chosen = {name: getattr(args, name) for name, *_ in PATH_METHOD_OPTIONS}
    return {**chosen, "xrai_scales": args.xrai_scales}


def explanation_options(args: argparse.Namespace) -> dict[str, Any]:
    """`SalienceClient.explain` keyword arguments from parsed explanation options."""
    return {
        "method": args.method,
        "layer": args.layer,
        "filter_indices": args.filter_indices or (),
        "objectives": args.objectives or (),
        "grad_modifiers": args.grad_modifiers or (),
        "keepdims": args.keepdims,
        # Unset unless turned off, so a model's configured default applies.
        "normalize": False if args.no_normalize else None,
        "keep_activation": args.keep_activation,
        "output_dtype": args.output_dtype,
        "backprop_modifier": args.backprop_modifier,
        "wrt": args.wrt,
        "penultimate_layer": args.penultimate_layer,
        "samples": args.samples,
        "noise": args.noise,
        "steps": args.steps,
        "seed": args.seed,
        "input_name": args.input_name,
        "output": args.output_head,
        **path_method_options(args),
    }


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand but `serve`, whose flags belong to the server."""
    parser = argparse.ArgumentParser(
        prog="salience",
        description="Serve Keras models and explain their predictions with saliency maps.",
        epilog="Run `salience COMMAND --help` for the options of one command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Listed for --help only: main() hands `serve` and its flags to the server's own
    # parser, so the client never imports the server to build this one.
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the server (needs `pip install 'salience[server]'`; "
        "`salience serve --help` lists its flags)",
    )

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"server address (default ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    connection.add_argument(
        "--timeout",
        type=parse_timeout,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    connection.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's CAs (implied by the --tls-* options)",
    )
    connection.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificates to verify the server's certificate with",
    )
    connection.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM client certificate, for a server that requires one (mutual TLS)",
    )
    connection.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert"
    )
    connection.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must carry, when not the --target host",
    )
    connection.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the bearer token to send (default ${TOKEN_ENV}, the token itself)",
    )
    connection.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        help="send the token without TLS to another machine (where the network is "
        "protected otherwise, such as by a service mesh)",
    )

    models = commands.add_parser(
        "models", parents=[connection], help="list the served models, their inputs and outputs"
    )
    models.add_argument("--json", action="store_true", help="print a JSON list")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, metavar="NAME", help="model name")
    model.add_argument(
        "--version",
        type=parse_version,
        default=0,
        metavar="V",
        help="model version (default: the highest served)",
    )
    model.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="a .npy file (a sample or a batch) or an image file; all form one batch",
    )

    predict = commands.add_parser(
        "predict", parents=[connection, model], help="run a model on input files"
    )
    predict.add_argument(
        "--out",
        type=Path,
        metavar="FILE.npz",
        help="write `predictions` (the first output) and `output_<name>` for every output "
        "instead of printing",
    )

    explain = commands.add_parser(
        "explain",
        parents=[connection, model, explanation_parser()],
        help="saliency maps of a model's predictions, as .npz or overlay PNGs",
        description="Saliency maps of a model's predictions. A negative layer index or "
        "objective needs the `=` form: --layer=-1, --objective=-1:2.",
    )
    explain.add_argument(
        "--colormap", default="jet", metavar="NAME", help="matplotlib colormap of overlays"
    )
    explain.add_argument(
        "--alpha",
        type=parse_alpha,
        default=0.5,
        metavar="A",
        help="weight of the map in overlays, in [0, 1] (default 0.5)",
    )
    explain.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.npz|DIR",
        help="a .npz file of the arrays, or a directory of overlay PNGs",
    )
    explain.set_defaults(subparser=explain)

    bench = commands.add_parser(
        "bench",
        parents=[connection, explanation_parser()],
        help="load-test a served model: throughput, latency percentiles, errors by status",
        description="Sends requests to a served model for a duration or a number of "
        "requests and reports throughput, latency p50/p90/p99/max and errors by status "
        "code. Closed loop (--concurrency callers) unless --rate starts requests on a "
        "schedule. Inputs are the INPUT files' samples, or random samples of the model's "
        "input shape when none is given.",
    )
    bench.add_argument("--model", required=True, metavar="NAME", help="model name")
    bench.add_argument(
        "--version", type=parse_version, default=0, metavar="V", help="model version"
    )
    bench.add_argument(
        "--rpc",
        choices=("predict", "explain", "oip-infer"),
        default="explain",
        help="the call to send: Predict, Explain, or the Open Inference Protocol's ModelInfer",
    )
    bench.add_argument(
        "--concurrency",
        type=parse_positive,
        default=1,
        metavar="N",
        help="requests in flight at once (closed loop; default 1)",
    )
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration",
        type=parse_timeout,
        metavar="SECONDS",
        help="how long to send requests (default 10)",
    )
    amount.add_argument(
        "--requests", type=parse_positive, metavar="N", help="how many requests to send"
    )
    bench.add_argument(
        "--rate",
        type=parse_timeout,
        metavar="R",
        help="open loop: start R requests per second whatever the answers (ignores "
        "--concurrency); latency counts from when each was due",
    )
    bench.add_argument(
        "--batch",
        type=parse_positive,
        default=1,
        metavar="N",
        help="samples per request (default 1)",
    )
    bench.add_argument(
        "--warmup",
        type=parse_count,
        metavar="N",
        help="requests sent and not counted before the run (default: --concurrency)",
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw the latency histogram and percentile curve to this PNG",
    )
    bench.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="INPUT",
        help="a .npy file or an image; without any, random samples of the model's shape",
    )
    bench.set_defaults(subparser=bench)

    # Its options and the work live in `review` (frames, video, report).
    from salience_client import review

    review.add_parser(commands, [connection])
    from salience_client import audit

    audit.add_parser(commands, [connection])
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and cross-checks a command line (not `serve`); usage errors exit 2."""
    args = build_parser().parse_args(list(argv))
    if args.command in ("explain", "bench"):
        subparser: argparse.ArgumentParser = args.subparser
        del args.subparser
        if args.objectives and (args.layer is not None or args.filter_indices):
            subparser.error(
                "--objective cannot be combined with --layer or --filter-indices: "
                f"write the layer and indices into the objective ({OBJECTIVE_FORMAT})"
            )
        args.objectives = args.objectives or []
        # Each --grad-modifier gives a list; their concatenation keeps the order given.
        args.grad_modifiers = [m for group in args.grad_modifiers or [] for m in group]
        seen: set[str] = set()
        for name in args.grad_modifiers:
            if name in seen:
                subparser.error(f"--grad-modifier lists {name!r} twice: list each once")
            seen.add(name)
    return args


# Inputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """The one model input the command line feeds: sample shape (None = free)."""

    model: str
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @classmethod
    def from_metadata(cls, metadata: pb.ModelMetadata) -> InputSpec:
        if len(metadata.inputs) != 1:
            names = ", ".join(repr(i.name) for i in metadata.inputs)
            raise UsageError(
                f"model {metadata.name!r} has {len(metadata.inputs)} inputs ({names}): the "
                "command line feeds models with one input; use the Python client"
            )
        spec = metadata.inputs[0]
        dtype = tensors.NUMPY_DTYPES.get(spec.dtype)
        if dtype is None or len(spec.shape) < 2:
            raise UsageError(
                f"model {metadata.name!r} input {spec.name!r} has dtype "
                f"{tensors.dtype_name(spec.dtype)} and shape {list(spec.shape)}, which the "
                "command line cannot feed"
            )
        shape = tuple(None if d < 0 else int(d) for d in spec.shape[1:])
        return cls(model=metadata.name, name=spec.name, dtype=np.dtype(dtype.name), shape=shape)

    def describe(self, batch: bool = True) -> str:
        """The shape as `[N, 8, 8, 3]` (batch first) or `[8, 8, 3]` (one sample)."""
        dims = (None, *self.shape) if batch else self.shape
        return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"

    @property
    def image_mode(self) -> str | None:
        """The Pillow mode an image must have for this input, or None (not an image)."""
        if len(self.shape) == 2:
            return "L"
        channels = self.shape[-1] if len(self.shape) == 3 else None
        return IMAGE_MODES.get(channels) if channels is not None else None


@dataclass(frozen=True)
class LoadedInput:
    """One INPUT file, batch first, in the model's dtype."""

    path: Path
    array: np.ndarray
    batched: bool
    """Whether the file held a batch (its samples are named `path[i]`)."""

    def labels(self) -> list[str]:
        if self.batched:
            return [f"{self.path.name}[{i}]" for i in range(len(self.array))]
        return [self.path.name]


@dataclass(frozen=True)
class InputBatch:
    """Every INPUT concatenated into the one batch a request carries."""

    array: np.ndarray
    sources: list[LoadedInput]

    def labels(self) -> list[str]:
        return [label for source in self.sources for label in source.labels()]


def _cast(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Casts to the model's dtype where no value changes meaning."""
    have, want = array.dtype, spec.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind in "biuf":
        return array.astype(want)
    if want.kind in "iu" and have.kind in "biu":
        info = np.iinfo(want)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(want)
    raise UsageError(
        f"{path} holds {have} values, but model {spec.model!r} input {spec.name!r} takes {want}"
    )


def _load_npy(path: Path, spec: InputSpec) -> LoadedInput:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"cannot read {path} as a .npy array: {err}") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()  # an .npz archive under a .npy name
        raise UsageError(
            f"{path} is an .npz archive, not a .npy array: save one array with np.save"
        )
    array = loaded
    rank = len(spec.shape)
    if array.ndim not in (rank, rank + 1):
        raise UsageError(
            f"{path} has shape {list(array.shape)}: model {spec.model!r} input {spec.name!r} "
            f"takes one sample of shape {spec.describe(batch=False)} or a batch of shape "
            f"{spec.describe()}"
        )
    batched = array.ndim == rank + 1
    if not batched:
        array = array[np.newaxis]
    for got, want in zip(array.shape[1:], spec.shape, strict=True):
        if want is not None and got != want:
            raise UsageError(
                f"{path} has shape {list(array.shape if batched else array.shape[1:])}: "
                f"model {spec.model!r} input {spec.name!r} takes a sample of shape "
                f"{spec.describe(batch=False)} or a batch of shape {spec.describe()}"
            )
    return LoadedInput(path, _cast(array, spec, path), batched)


def _image_pixels(image: Any, mode: str, spec: InputSpec) -> np.ndarray:
    """Pixels in the input's mode; floats in [0, 1] for a floating-point input."""
    if mode == "L" and image.mode.startswith("I;16"):
        # Pillow converts 16-bit grey to "L" by clipping, not scaling: scale here.
        values = np.asarray(image, dtype=np.float64) / 65535.0
        if spec.dtype.kind == "f":
            return values.astype(spec.dtype)
        return np.round(values * 255.0).astype(np.uint8)
    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    if spec.dtype.kind == "f":
        return (pixels.astype(np.float32) / np.float32(255)).astype(spec.dtype)
    return pixels


def _load_image(path: Path, spec: InputSpec) -> LoadedInput:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise UsageError(f"{path} is neither a .npy file nor an image Pillow can read") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    with image:
        mode = spec.image_mode
        if mode is None:
            raise UsageError(
                f"{path} is an image, but model {spec.model!r} input {spec.name!r} takes shape "
                f"{spec.describe()}, which is not an image (H×W or H×W×C with C in 1, 3, 4): "
                "pass a .npy file"
            )
        height, width = spec.shape[0], spec.shape[1]
        if (height is not None and image.height != height) or (
            width is not None and image.width != width
        ):
            want = f"{width or 'any'}×{height or 'any'}"
            raise UsageError(
                f"{path} is {image.width}×{image.height} pixels (width×height), but model "
                f"{spec.model!r} takes {want} images: resize it first (images are never "
                "resized for you)"
            )
        pixels = _image_pixels(image, mode, spec)
    if len(spec.shape) == 3 and pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    return LoadedInput(path, _cast(pixels, spec, path)[np.newaxis], batched=False)


def check_readable(paths: Sequence[Path]) -> None:
    """Fails on a missing input before any call, so the message is about the file."""
    for path in paths:
        if not path.exists():
            raise UsageError(f"input {path} does not exist")
        if not path.is_file():
            raise UsageError(f"input {path} is not a file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"input {path} is not readable")


def load_input(path: Path, spec: InputSpec) -> LoadedInput:
    """One INPUT file: `.npy` by its suffix, anything else as an image."""
    check_readable([path])
    if path.suffix.lower() == ".npy":
        return _load_npy(path, spec)
    return _load_image(path, spec)


def load_inputs(paths: Sequence[Path], metadata: pb.ModelMetadata) -> InputBatch:
    """Every INPUT read for the model `metadata` describes, as one batch."""
    spec = InputSpec.from_metadata(metadata)
    sources = [load_input(path, spec) for path in paths]
    first = sources[0]
    for source in sources[1:]:
        if source.array.shape[1:] != first.array.shape[1:]:
            raise UsageError(
                f"{source.path} has samples of shape {list(source.array.shape[1:])} but "
                f"{first.path} of {list(first.array.shape[1:])}: one batch needs one shape"
            )
    array = np.concatenate([s.array for s in sources]) if len(sources) > 1 else first.array
    return InputBatch(np.ascontiguousarray(array), sources)


# Output -------------------------------------------------------------------------


def _shape(values: Sequence[int]) -> list[int | None]:
    return [None if d < 0 else int(d) for d in values]


def _spec_json(spec: pb.TensorSpec) -> dict[str, Any]:
    found: dict[str, Any] = {
        "name": spec.name,
        "dtype": tensors.dtype_name(spec.dtype),
        "shape": _shape(spec.shape),
    }
    if spec.labels:
        found["labels"] = list(spec.labels)
    return found


def version_state(status: pb.VersionStatus) -> str:
    """`loading`, `ready`, `failed` or `unloading`."""
    return pb.VersionState.Name(status.state).removeprefix("VERSION_STATE_").lower()


def models_json(models: Sequence[pb.ModelMetadata]) -> list[dict[str, Any]]:
    """`salience models --json`: shapes use null for a free dimension."""
    return [
        {
            "name": m.name,
            "versions": [int(v) for v in m.versions],
            "version": int(m.version),
            "inputs": [_spec_json(s) for s in m.inputs],
            "outputs": [_spec_json(s) for s in m.outputs],
            "max_batch_size": int(m.max_batch_size),
            "version_status": [
                {"version": int(s.version), "state": version_state(s), "reason": s.reason}
                for s in m.version_status
            ],
        }
        for m in models
    ]


def format_models(models: Sequence[pb.ModelMetadata]) -> list[str]:
    """`salience models`: one block per model, one line per input and output."""
    lines: list[str] = []
    for m in models:
        versions = ", ".join(str(v) for v in m.versions)
        if m.versions:
            lines.append(f"{m.name}  version {m.version} (served: {versions})")
        else:
            lines.append(f"{m.name}  not served")
        # Versions that are not simply served: loading, unloading, or failed with why.
        for status in m.version_status:
            if status.state == pb.VERSION_STATE_READY and not status.reason:
                continue
            which = f"version {status.version}" if status.version else "config.toml"
            line = f"  {which}: {version_state(status)}"
            lines.append(line + (f": {status.reason}" if status.reason else ""))
        rows = [("input", s) for s in m.inputs] + [("output", s) for s in m.outputs]
        width = max((len(s.name) for _, s in rows), default=0)
        for kind, s in rows:
            shape = ", ".join("N" if d is None else str(d) for d in _shape(s.shape))
            line = f"  {kind:<6} {s.name:<{width}}  {tensors.dtype_name(s.dtype):<7}  [{shape}]"
            if s.labels:
                shown = ", ".join(s.labels[:LABELS_SHOWN])
                more = len(s.labels) - LABELS_SHOWN
                line += f"  labels: {shown}" + (f", … ({more} more)" if more > 0 else "")
            lines.append(line)
    if not models:
        lines.append("no models served")
    return lines


def softmax_like(values: np.ndarray) -> bool:
    """A batch of probability vectors: non-negative rows of two or more that sum to 1."""
    if values.ndim != 2 or values.shape[1] < 2 or values.dtype.kind != "f":
        return False
    rows = values.astype(np.float64)
    tolerance = 1e-2 if values.dtype.itemsize < 4 else 1e-4
    return bool(
        np.all(rows >= 0) and np.all(rows <= 1) and np.allclose(rows.sum(axis=1), 1, atol=tolerance)
    )


def format_predictions(
    outputs: dict[str, np.ndarray],
    labels: Sequence[str],
    class_labels: Sequence[str] = (),
    labelled_output: str = "",
) -> list[str]:
    """One line per sample and output; a probability output also names its arg-max,
    and the labelled output (`labelled_output`) each sample's class label.
    """
    lines = []
    for k, label in enumerate(labels):
        for name, values in outputs.items():
            sample = values[k]
            text = np.array2string(
                sample,
                precision=4,
                suppress_small=True,
                separator=", ",
                max_line_width=1_000_000,
                threshold=64,
            )
            line = f"{label}  {name}: {text}"
            if softmax_like(values):
                top = int(np.argmax(sample))
                line += f"  argmax {top} ({float(sample[top]):.4f})"
            if name == labelled_output and k < len(class_labels):
                line += f"  label {class_labels[k]!r}"
            lines.append(line)
    return lines


def _check_npz(path: Path) -> None:
    if path.suffix.lower() != ".npz":
        raise UsageError(f"--out {path} must name a .npz file")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    _check_npz(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a plain dict[str, Any]: numpy's stubs read `**arrays` as its keywords.
        payload: dict[str, Any] = dict(arrays)
        np.savez(path, **payload)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def output_arrays(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`predictions` (the first output) and `output_<name>` for every output."""
    arrays = {"predictions": next(iter(outputs.values()))}
    arrays.update({f"output_{name}": values for name, values in outputs.items()})
    return arrays


def explanation_arrays(result: Explanation) -> dict[str, np.ndarray]:
    """The outputs, `saliency_<modifier>` per map, and `saliency` when there is one map."""
    arrays = output_arrays(result.outputs)
    arrays.update({f"saliency_{name}": m for name, m in result.maps.items()})
    if len(result.maps) == 1:
        arrays["saliency"] = next(iter(result.maps.values()))
    if result.completeness_residual is not None and result.score_difference is not None:
        arrays["completeness_residual"] = result.completeness_residual
        arrays["score_difference"] = result.score_difference
    return arrays


def check_overlayable(batch: InputBatch, keepdims: bool) -> None:
    """Overlays need image samples (H×W or H×W×C, C in 1, 3, 4) to draw maps over."""
    sample = batch.array.shape[1:]
    if not (len(sample) == 2 or (len(sample) == 3 and sample[-1] in IMAGE_MODES)):
        raise UsageError(
            f"the inputs have samples of shape {list(sample)}, which are not images (H×W or "
            "H×W×C with C in 1, 3, 4), so no overlay can be drawn: use --out FILE.npz"
        )
    if len(sample) == 2 and not keepdims:
        # Without a channel axis the server's channel reduction takes the width away.
        raise UsageError(
            f"the inputs are H×W images {list(sample)} without a channel axis, whose maps "
            "lose the last axis to the channel reduction: add --keepdims, or use --out FILE.npz"
        )


def _unique_stems(sources: Sequence[LoadedInput]) -> list[str]:
    """File stems, with -2, -3... added to repeats, so no overlay overwrites another."""
    seen: dict[str, int] = {}
    stems = []
    for source in sources:
        stem = source.path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def write_overlays(
    directory: Path,
    batch: InputBatch,
    result: Explanation,
    *,
    colormap: str,
    alpha: float,
    titles: Sequence[str] | None = None,
) -> list[Path]:
    """`<stem>_<modifier>.png` per input (`<stem>_<i>_<modifier>.png` for a batch file).

    With `titles` (one per sample), each overlay is drawn under its sample's title.
    """
    from salience_client.overlay import save_overlay

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create directory {directory}: {err.strerror or err}") from None
    written = []
    k = 0
    for source, stem in zip(batch.sources, _unique_stems(batch.sources), strict=True):
        for i in range(len(source.array)):
            prefix = f"{stem}_{i}" if source.batched else stem
            for modifier, maps in result.maps.items():
                path = directory / f"{prefix}_{modifier}.png"
                try:
                    if titles is None:
                        save_overlay(path, batch.array[k], maps[k], colormap=colormap, alpha=alpha)
                    else:
                        _save_titled(path, batch.array[k], maps[k], titles[k], colormap, alpha)
                except OSError as err:
                    raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
                written.append(path)
            k += 1
    return written


def _save_titled(
    path: Path, image: np.ndarray, saliency: np.ndarray, title: str, colormap: str, alpha: float
) -> None:
    from PIL import Image

    from salience_client.overlay import overlay
    from salience_client.report import titled

    rgb = overlay(image, saliency, colormap=colormap, alpha=alpha)
    Image.fromarray(titled(rgb, title)).save(path, format="PNG")


# Commands -----------------------------------------------------------------------


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's first line, else $SALIENCE_TOKEN, else None.

    Messages never include it.
    """
    path: Path | None = getattr(args, "token_file", None)
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not ASCII text"
        raise UsageError(f"--token-file {path} cannot be read: {reason}") from None
    token = text.strip()
    if not token:
        raise UsageError(f"--token-file {path} is empty: write the token into it")
    return token


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """The `tls`, `token` and `allow_plaintext_token` arguments of the client."""
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    server_name = getattr(args, "tls_server_name", None)
    tls = None
    if getattr(args, "tls", False) or any(v is not None for v in (ca, cert, key, server_name)):
        try:
            tls = TLS.from_files(ca, cert, key, server_name=server_name)
        except ValueError as err:
            raise UsageError(f"{err} (--tls-ca, --tls-cert, --tls-key)") from None
    return {
        "tls": tls,
        "token": read_token(args),
        "allow_plaintext_token": getattr(args, "allow_plaintext_token", False),
    }


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[SalienceClient]:
    try:
        client = SalienceClient(args.target, timeout=args.timeout, **client_security(args))
    except ValueError as err:  # a token over plaintext, a malformed token
        raise UsageError(str(err)) from None
    with client:
        yield client


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps(models_json(models), indent=2))
    else:
        _print_lines(format_models(models))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    if args.out is not None:
        _check_npz(args.out)
    check_readable(args.inputs)
    with _client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
        batch = load_inputs(args.inputs, metadata)
        prediction = client.predict(args.model, batch.array, version=args.version)
    if args.out is not None:
        print(write_npz(args.out, output_arrays(prediction.outputs)))
    else:
        print(f"model {args.model} version {prediction.model_version}")
        labelled = next((s.name for s in metadata.outputs if s.labels), "")
        _print_lines(
            format_predictions(prediction.outputs, batch.labels(), prediction.labels, labelled)
        )
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    to_npz = args.out.suffix.lower() == ".npz"
    if not to_npz:
        from salience_client.overlay import get_colormap

        try:
            get_colormap(args.colormap)
        except ValueError as err:
            raise UsageError(f"--colormap: {err}") from None
    check_readable(args.inputs)
    with _client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
        batch = load_inputs(args.inputs, metadata)
        if not to_npz:
            check_overlayable(batch, args.keepdims)
        result = client.explain(
            args.model,
            batch.array,
            version=args.version,
            **explanation_options(args),
        )
    if to_npz:
        written = [write_npz(args.out, explanation_arrays(result))]
    else:
        from salience_client.report import class_titles

        # A classifier's overlays are titled with the predicted class and its score.
        titles = class_titles(
            metadata,
            result.outputs,
            result.labels,
            output=args.output_head,
            filter_indices=(args.filter_indices or ()) if args.layer is None else (),
        )
        written = write_overlays(
            args.out, batch, result, colormap=args.colormap, alpha=args.alpha, titles=titles
        )
    _print_lines([str(p) for p in written])
    return EXIT_OK


def bench_samples(args: argparse.Namespace, metadata: pb.ModelMetadata) -> np.ndarray:
    """The samples `salience bench` sends: from INPUT files, or random of the input shape."""
    from salience_client.bench import random_samples

    if args.inputs:
        check_readable(args.inputs)
        return load_inputs(args.inputs, metadata).array
    spec = InputSpec.from_metadata(metadata)
    if any(d is None for d in spec.shape):
        raise UsageError(
            f"model {spec.model!r} input {spec.name!r} has shape {spec.describe()} with free "
            "dimensions, so random samples have no size: pass INPUT files"
        )
    shape = [int(d) for d in spec.shape if d is not None]
    return random_samples(spec.dtype, shape, max(args.batch, 16))


def cmd_bench(args: argparse.Namespace) -> int:
    from salience_client import bench

    # Checked before the run: a load test is not something to repeat for a typo.
    try:
        # The clients' TLS and token, without retries: every refusal is a figure.
        channel = ChannelConfig(args.target, retry=None, **client_security(args))
    except ValueError as err:  # a token over plaintext, a malformed token
        raise UsageError(str(err)) from None
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {args.plot} must name a .png file")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
    samples = bench_samples(args, metadata)
    payloads = bench.payloads(
        args.rpc,
        args.model,
        samples,
        args.batch,
        version=args.version,
        options=explanation_options(args) if args.rpc == "explain" else None,
        input_name=metadata.inputs[0].name if metadata.inputs else "",
    )
    duration = None if args.requests is not None else args.duration or DEFAULT_BENCH_SECONDS
    load = bench.Load(
        target=args.target,
        rpc=args.rpc,
        payloads=payloads,
        samples_per_request=args.batch,
        concurrency=args.concurrency,
        duration=duration,
        requests=args.requests,
        rate=args.rate,
        timeout=args.timeout,
        warmup=args.concurrency if args.warmup is None else args.warmup,
        channel=channel,
    )
    result = bench.run(load, progress=True)
    if args.plot is not None:
        bench.plot(result, args.plot)
    if args.json:
        summary = {"target": args.target, "model": args.model, **result.summary()}
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {args.model} at {args.target}")
        _print_lines(result.format())
    # Errors are figures of a load test; only a run where nothing succeeded fails.
    return EXIT_OK if result.ok else EXIT_FAILURE


def cmd_audit(args: argparse.Namespace) -> int:
    from salience_client.audit import cmd_audit as audit

    return audit(args)


def cmd_review(args: argparse.Namespace) -> int:
    from salience_client.review import cmd_review as review

    return review(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": cmd_models,
    "predict": cmd_predict,
    "explain": cmd_explain,
    "bench": cmd_bench,
    "review": cmd_review,
    "audit": cmd_audit,
}

SERVER_EXTRA_HINT = "install the server with: pip install 'salience[server]'"


def cmd_serve(argv: Sequence[str]) -> int:
    """`salience serve [flags]`: the server's own flags, parsed by its settings."""
    try:
        from salience_server.settings import Settings, SettingsError
    except ImportError as err:
        print(
            f"salience serve: the server is not installed ({err}); {SERVER_EXTRA_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    parser = argparse.ArgumentParser(
        prog="salience serve",
        description="Serve the Keras models of a model repository over gRPC. Every flag "
        "can also be set by its SALIENCE_* environment variable.",
    )
    Settings.add_arguments(parser)
    flags = parser.parse_args(list(argv))
    try:
        settings = Settings.load(flags)
    except SettingsError as err:
        print(f"salience serve: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from salience_server.app import serve
        from salience_server.plugins import PluginError
        from salience_server.repository import RepositoryError
    except ImportError as err:
        # The server package ships with the client; its dependencies come with the extra.
        print(
            f"salience serve: a server dependency is missing ({err}); {SERVER_EXTRA_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        serve(settings)
    except (RepositoryError, PluginError, SettingsError, OSError) as err:
        print(f"salience serve: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# Errors and the entry point -----------------------------------------------------


def report_error(err: SalienceError, target: str, timeout: float | None) -> None:
    """`error: STATUS: message`, with a hint for the failures a user can fix here."""
    print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
    if err.code == grpc.StatusCode.UNAVAILABLE:
        print(
            f"hint: no salience server answered at {target}: start one with `salience serve`, "
            f"or point --target (or ${TARGET_ENV}) at a running one",
            file=sys.stderr,
        )
    elif err.code == grpc.StatusCode.UNAUTHENTICATED:
        print(
            f"hint: the server asks for a bearer token: pass --token-file FILE, or set "
            f"${TOKEN_ENV}",
            file=sys.stderr,
        )
    elif err.code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        print(
            f"hint: the call took longer than --timeout {timeout:g} seconds: raise it, or send "
            "fewer inputs",
            file=sys.stderr,
        )


def _exit_status(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `salience` command line; returns its exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    # Overlays only read matplotlib's colormaps, but should anything load a backend in
    # this process, it must be one that needs no display.
    os.environ.setdefault("MPLBACKEND", "Agg")
    args: argparse.Namespace | None = None
    try:
        if words[:1] == ["serve"]:
            return cmd_serve(words[1:])
        args = parse_args(words)
        return COMMANDS[args.command](args)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        return _exit_status(exit_.code)
    except UsageError as err:
        command = f"salience {args.command}" if args is not None else "salience"
        print(f"{command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SalienceError as err:
        report_error(err, getattr(args, "target", DEFAULT_TARGET), getattr(args, "timeout", None))
        return EXIT_FAILURE
    except tensors.TensorError as err:
        print(f"error: the server's answer cannot be decoded: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
