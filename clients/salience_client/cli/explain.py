"""`salience explain`: saliency maps of a model's predictions, as `.npz` or overlay PNGs.

The explanation options themselves live in `salience_client.cli.explanation_options`
(shared with `bench`); this module adds what only `explain` has: overlays and --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from salience_client.cli.explanation_options import (
    check_explanation_args,
    explanation_options,
    explanation_parser,
)
from salience_client.cli.options import (
    EXIT_OK,
    UsageError,
    model_parser,
    open_client,
    parse_alpha,
    print_lines,
)
from salience_client.cli.outputs import (
    check_overlayable,
    explanation_arrays,
    write_npz,
    write_overlays,
)
from salience_client.inputs import check_readable, load_inputs


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `explain` to the `salience` subcommands."""
    explain = commands.add_parser(
        "explain",
        parents=[connection, model_parser(), explanation_parser()],
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
        "--plain",
        action="store_true",
        help="overlays alone at the input's size, without the title (the predicted class "
        "or value), the colour bar and the enlargement to a legible size",
    )
    explain.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.npz|DIR",
        help="a .npz file of the arrays, or a directory of overlay PNGs",
    )
    explain.set_defaults(run=run, check=lambda args: check_explanation_args(args, explain))


def run(args: argparse.Namespace) -> int:
    to_npz = args.out.suffix.lower() == ".npz"
    if not to_npz:
        from salience_client.overlay import get_colormap

        try:
            get_colormap(args.colormap)
        except ValueError as err:
            raise UsageError(f"--colormap: {err}") from None
    check_readable(args.inputs)
    with open_client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
        batch = load_inputs(args.inputs, metadata, float32=args.float32)
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
        from salience_client.report import class_titles, value_titles

        # Titled with the predicted class and its score (a classifier), or the
        # predicted value; --plain: the overlay alone, at the input's size.
        units = (args.filter_indices or ()) if args.layer is None else ()
        titles = None
        if not args.plain:
            titles = class_titles(
                metadata,
                result.outputs,
                result.labels,
                output=args.output_head,
                filter_indices=units,
            ) or value_titles(result.outputs, output=args.output_head, filter_indices=units)
        written = write_overlays(
            args.out, batch, result, colormap=args.colormap, alpha=args.alpha, titles=titles
        )
    print_lines([str(p) for p in written])
    return EXIT_OK
