"""`salience bench`: load-test a served model (the load itself is `salience_client.bench`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client.channel import ChannelConfig
from salience_client.cli.explanation_options import (
    check_explanation_args,
    explanation_options,
    explanation_parser,
)
from salience_client.cli.options import (
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    client_security,
    open_client,
    parse_count,
    parse_positive,
    parse_timeout,
    parse_version,
    print_lines,
)
from salience_client.inputs import InputSpec, check_readable, load_inputs

DEFAULT_BENCH_SECONDS = 10.0


def add_parser(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Adds `bench` to the `salience` subcommands."""
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
    bench.add_argument(
        "--float32",
        action="store_true",
        help="send image INPUTs as float32 even where the model accepts uint8 pixels",
    )
    bench.set_defaults(run=run, check=lambda args: check_explanation_args(args, bench))


def bench_samples(args: argparse.Namespace, metadata: pb.ModelMetadata) -> np.ndarray:
    """The samples `salience bench` sends: from INPUT files, or random of the input shape."""
    from salience_client.bench import random_samples

    if args.inputs:
        check_readable(args.inputs)
        return load_inputs(args.inputs, metadata, float32=args.float32).array
    spec = InputSpec.from_metadata(metadata)
    if any(d is None for d in spec.shape):
        raise UsageError(
            f"model {spec.model!r} input {spec.name!r} has shape {spec.describe()} with free "
            "dimensions, so random samples have no size: pass INPUT files"
        )
    shape = [int(d) for d in spec.shape if d is not None]
    return random_samples(spec.dtype, shape, max(args.batch, 16))


def run(args: argparse.Namespace) -> int:
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
    with open_client(args) as client:
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
        print_lines(result.format())
    # Errors are figures of a load test; only a run where nothing succeeded fails.
    return EXIT_OK if result.ok else EXIT_FAILURE
