"""The explanation options of `salience explain` and `salience bench`, in one place.

`explanation_parser` declares them, `check_explanation_args` cross-checks what was
parsed and `explanation_options` turns them into `SalienceClient.explain` keyword
arguments. A new method's options go here, and nowhere else in the command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from salience_client.cli.options import (
    OBJECTIVE_FORMAT,
    parse_count,
    parse_indices,
    parse_layer,
    parse_names,
    parse_non_negative,
    parse_objective,
)

OUTPUT_DTYPES = ("float32", "float16", "uint8")


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
        "integrated-gradients, gradient-x-input, scorecam, faster-scorecam, layercam, occlusion, "
        "blur-ig, guided-ig, xrai",
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
    # Score-CAM, Faster-ScoreCAM and occlusion.
    forward = options.add_argument_group("Score-CAM and occlusion options")
    forward.add_argument(
        "--chunk-size",
        type=parse_count,
        default=0,
        metavar="N",
        help="rows per batched forward pass (64; at most 1024)",
    )
    forward.add_argument(
        "--top-channels",
        type=parse_count,
        default=0,
        metavar="K",
        help="Faster-ScoreCAM: channels of highest variance scored (10)",
    )
    forward.add_argument(
        "--window",
        type=parse_count,
        default=0,
        metavar="W",
        help="occlusion window side in pixels (16, or the input's smallest extent)",
    )
    forward.add_argument(
        "--stride",
        type=parse_count,
        default=0,
        metavar="S",
        help="occlusion stride in pixels (half the window)",
    )
    forward.add_argument(
        "--occlusion-value", type=float, metavar="V", help="value of occluded pixels (0)"
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
        "chunk_size": args.chunk_size,
        "top_channels": args.top_channels,
        "window": args.window,
        "stride": args.stride,
        "occlusion_value": args.occlusion_value,
    }


def check_explanation_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Cross-checks the parsed explanation options (usage errors exit 2) and
    flattens the repeated --grad-modifier lists.
    """
    if args.objectives and (args.layer is not None or args.filter_indices):
        parser.error(
            "--objective cannot be combined with --layer or --filter-indices: "
            f"write the layer and indices into the objective ({OBJECTIVE_FORMAT})"
        )
    args.objectives = args.objectives or []
    # Each --grad-modifier gives a list; their concatenation keeps the order given.
    args.grad_modifiers = [m for group in args.grad_modifiers or [] for m in group]
    seen: set[str] = set()
    for name in args.grad_modifiers:
        if name in seen:
            parser.error(f"--grad-modifier lists {name!r} twice: list each once")
        seen.add(name)
