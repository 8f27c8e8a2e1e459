"""`salience predict`: a model's outputs for INPUT files, printed or as `.npz`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience_client.cli.options import (
    EXIT_OK,
    model_parser,
    open_client,
    print_lines,
)
from salience_client.cli.outputs import check_npz, output_arrays, write_npz
from salience_client.inputs import check_readable, load_inputs


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `predict` to the `salience` subcommands."""
    predict = commands.add_parser(
        "predict", parents=[connection, model_parser()], help="run a model on input files"
    )
    predict.set_defaults(run=run)
    predict.add_argument(
        "--out",
        type=Path,
        metavar="FILE.npz",
        help="write `predictions` (the first output) and `output_<name>` for every output "
        "instead of printing",
    )


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


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_npz(args.out)
    check_readable(args.inputs)
    with open_client(args) as client:
        metadata = client.metadata(args.model, version=args.version)
        batch = load_inputs(args.inputs, metadata, float32=args.float32)
        prediction = client.predict(args.model, batch.array, version=args.version)
    if args.out is not None:
        print(write_npz(args.out, output_arrays(prediction.outputs)))
    else:
        print(f"model {args.model} version {prediction.model_version}")
        labelled = next((s.name for s in metadata.outputs if s.labels), "")
        print_lines(
            format_predictions(prediction.outputs, batch.labels(), prediction.labels, labelled)
        )
    return EXIT_OK
