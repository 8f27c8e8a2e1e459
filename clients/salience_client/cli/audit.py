"""`salience audit`: score where saliency maps land and whether they are faithful
(the work is `salience_client.audit`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from salience_client import audit
from salience_client import audit_metrics as am
from salience_client.cli.options import EXIT_OK, UsageError, open_client, parse_positive

DESCRIPTION = """\
For every image of a data set with object masks, asks the server for maps (one
request per predicted class and batch, never per image) and scores them:

  where the map lands   the share of the map's mass inside the object mask (and the
                        cue mask, when there is one) and the pointing game (is the
                        maximum inside); per image, summarised over the images
  is it faithful        deletion and insertion curves (Petsiuk et al. 2018, RISE):
                        pixels removed from the image, or added to a blurred copy,
                        in order of saliency in --steps steps, the model's score of
                        the class it first predicted read back at every step; the
                        same curves with a random order are the baseline to beat
  sanity check          maps of copies of the model with its top 1, 2, ... weighted
                        layers re-initialised, compared with the trained model's by
                        Spearman rank correlation (Adebayo et al. 2018)

Data: 'generated' draws --count fresh images (shapes on a textured background cue of
random kind) for the model's input shape, the same for every model; or DIR: images
NAME.png (or .jpg) with their object mask NAME.mask.png beside them (non-zero pixels
are the object) and optionally a cue mask NAME.cue.png, of the model's input size.

The summary on stderr gives the median energy share over the images and the mean
deletion and insertion areas; --json has every statistic (n, mean, median, q1, q3,
min, max). Output: --json FILE (else stdout), --report FILE.html (one file, plots
and images embedded), --plot FILE.png (the energy-share plot alone).
"""


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `audit` to the `salience` subcommands."""
    parser = commands.add_parser(
        "audit",
        parents=[connection],
        help="score where saliency maps land and whether they are faithful",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME[,NAME...]",
        help="the model(s) to audit, all on the same data (required)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR|generated",
        help="an image directory with masks, or 'generated' (required)",
    )
    parser.add_argument(
        "--count",
        type=parse_positive,
        default=audit.DEFAULT_COUNT,
        metavar="N",
        help=f"images to audit: all generated, at most N of DIR (default {audit.DEFAULT_COUNT})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=audit.DEFAULT_SEED,
        metavar="N",
        help=f"seed of the generated data and of the random orders (default {audit.DEFAULT_SEED})",
    )
    parser.add_argument(
        "--methods",
        default=audit.DEFAULT_METHODS,
        metavar="M[,M...]",
        help=f"of {', '.join(audit.METHOD_OPTIONS)} (default {audit.DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--steps",
        type=parse_positive,
        default=audit.DEFAULT_STEPS,
        metavar="K",
        help=f"steps of the deletion and insertion curves (default {audit.DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--baseline",
        choices=("rise", "zeros", "blur"),
        default="rise",
        help="what removed pixels become: rise = zeros for deletion, blur for insertion "
        "(default rise)",
    )
    parser.add_argument(
        "--blur-sigma",
        type=float,
        default=audit.DEFAULT_BLUR_SIGMA,
        metavar="PX",
        help=f"Gaussian blur of the blurred baseline, in pixels "
        f"(default {audit.DEFAULT_BLUR_SIGMA:g})",
    )
    parser.add_argument(
        "--randomize-images",
        type=int,
        default=audit.DEFAULT_RANDOMIZE_IMAGES,
        metavar="N",
        help="images of the randomisation check, 0 skips it "
        f"(default {audit.DEFAULT_RANDOMIZE_IMAGES})",
    )
    parser.add_argument(
        "--batch-size",
        type=parse_positive,
        default=audit.DEFAULT_BATCH,
        metavar="B",
        help=f"images per request (default {audit.DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write the figures here (default: stdout)"
    )
    parser.add_argument(
        "--report", type=Path, metavar="FILE.html", help="write the HTML report (default: none)"
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="write the energy plot (default: none)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: one on stderr)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs the audit of every `--model` on one data set."""
    from tqdm import tqdm

    models = [m for m in args.model.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in audit.METHOD_OPTIONS]
    if unknown or not methods:
        raise UsageError(
            f"--methods {','.join(unknown) or '(none)'}: choose from "
            + ", ".join(audit.METHOD_OPTIONS)
        )
    if args.report is not None and args.report.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--report {args.report} must name an .html file")
    result: dict[str, Any] = {"models": {}}
    arrays: dict[str, Any] = {}
    with open_client(args) as client:
        shape = [int(d) for d in client.metadata(models[0]).inputs[0].shape[1:]]
        if args.data == "generated":
            data = audit.generated_data(shape, args.count, args.seed)
        else:
            data = audit.directory_data(Path(args.data), shape, args.count)
        result.update(
            data=data.source,
            images=len(data.images),
            methods=methods,
            steps=args.steps,
            baseline=args.baseline,
            blur_sigma=args.blur_sigma,
            seed=args.seed,
            object_area=am.summary(data.masks.reshape(len(data.masks), -1).mean(axis=1)),
        )
        if data.cue_masks is not None:
            result["cue_area"] = am.summary(
                data.cue_masks.reshape(len(data.cue_masks), -1).mean(axis=1)
            )
        per_model = 2 + 3 * len(methods)
        with tqdm(
            total=per_model * len(models),
            desc="audit",
            unit="step",
            disable=args.no_progress,
            file=sys.stderr,
        ) as bar:

            def progress(what: str) -> None:
                bar.set_postfix_str(what)
                bar.update(1)

            for model in models:
                figures, arrays[model] = audit.audit_model(
                    client, model, data, methods, args, progress
                )
                result["models"][model] = figures
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        args.plot.write_bytes(audit.energy_plot(result))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(audit.render_report(result, arrays, data), encoding="utf-8")
    print(audit.summary_lines(result), file=sys.stderr)
    return EXIT_OK
