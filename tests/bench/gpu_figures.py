"""The figures of scripts/gpu-check: the engine and the service on one device, as JSON.

    python -m tests.bench.gpu_figures --device gpu --out bench.json
    python -m tests.bench.gpu_figures --device cpu --rehearsal --out bench.json

On a MobileNetV2 with random weights (224×224×3, 1000 classes unless told; batch
norms calibrated on the inputs, as in test_engine_bench, so that maps are not
rounding noise), the vanilla `absolute` map of one class, one process per server:

- ideal: `runtime.compute` + `runtime.finish` in-process (no gRPC, no queue) at
  each `--ideal-batches` size;
- precision: float32, XLA, float16 and bfloat16 at one batch, in-process: ms per
  image (and the first call: tracing, XLA compilation) and how far maps and
  predictions land from float32's;
- tf-keras-vis: `Saliency` (ReplaceToLinear) per request of one image on the same
  device, against ours at batch 1, with the correlation of their maps;
- service: `salience serve` in a subprocess per configuration (batching on, off;
  `--frontends` where the server has the setting), driven by salience_client.bench
  from this process at each `--concurrency`, closed loop, one image per request;
  samples per device call from the server's metrics; the device memory gauge
  scraped after the load.

Nothing is asserted about time; every figure goes into the JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.processes import ServerProcess, salience_serve

MODEL = "mobilenet"
CLASS = 7
DISTINCT = 16  # distinct images cycled through by every measurement

FULL = {
    "image_size": 224,
    "classes": 1000,
    "alpha": 1.0,
    "ideal_batches": "1,32,128",
    "concurrency": "1,32,256",
    "precision_batch": 32,
    "max_device_batch_size": 128,
    "window_s": 4.0,
    "ideal_s": 2.0,
    "frontends": 4,
}
# The CPU rehearsal: every phase on the smallest MobileNetV2 the application builds.
REHEARSAL = {
    "image_size": 32,
    "classes": 10,
    "alpha": 0.35,
    "ideal_batches": "1,4",
    "concurrency": "1,4",
    "precision_batch": 2,
    "max_device_batch_size": 4,
    "window_s": 0.6,
    "ideal_s": 0.3,
    "frontends": 2,
}


def numbers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.gpu_figures")
    parser.add_argument("--device", default="gpu", help="cpu, gpu or gpu:N (default gpu)")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--rehearsal", action="store_true", help="the small CPU sizes")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--classes", type=int)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--ideal-batches", type=numbers)
    parser.add_argument("--concurrency", type=numbers)
    parser.add_argument("--precision-batch", type=int)
    parser.add_argument("--max-device-batch-size", type=int)
    parser.add_argument("--window-s", type=float, help="seconds of load per service figure")
    parser.add_argument("--ideal-s", type=float, help="seconds of calls per ideal figure")
    parser.add_argument("--frontends", type=int, help="front ends to compare with 1, if any")
    args = parser.parse_args(argv)
    defaults = REHEARSAL if args.rehearsal else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, numbers(value) if isinstance(value, str) else value)
    return args


def milliseconds(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.median(ms)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def repeat(fn: Callable[[], Any], seconds: float, least: int = 3) -> list[float]:
    """Wall times of calls of `fn` for `seconds` (at least `least` calls)."""
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < least:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# The model ---------------------------------------------------------------------------


def build_model(args: argparse.Namespace, images: np.ndarray) -> Any:
    """MobileNetV2, random weights, batch norms set to their inputs' statistics by one
    training-mode pass with momentum 0 (as a trained network's would be).
    """
    import keras

    keras.utils.set_random_seed(0)
    size = args.image_size
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(size, size, 3), classes=args.classes, alpha=args.alpha
    )
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images[:8], training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    return model


def load_runtime(path: Path, placement: Any) -> Any:
    import keras
    import tensorflow as tf

    from salience_server.runtime import ModelRuntime

    with tf.device(placement.device):
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return ModelRuntime(MODEL, 1, model, path, placement=placement)


def options() -> Any:
    from salience_server.explain.options import ExplainOptions, Objective

    return ExplainOptions(objectives=(Objective(None, (CLASS,)),))


# In-process phases ---------------------------------------------------------------


def ideal(runtime: Any, images: np.ndarray, batches: Sequence[int], seconds: float) -> list[dict]:
    rows = []
    for batch in batches:
        x = images[[k % len(images) for k in range(batch)]]
        plan = runtime.plan(options(), batch)

        def once(x: np.ndarray = x, plan: Any = plan) -> None:
            outputs, raw = runtime.compute(plan.graph, [x], plan.params)
            runtime.finish(plan, outputs, raw)

        start = time.perf_counter()
        once()  # the first call at a new batch size traces and builds its kernels
        first = time.perf_counter() - start
        times = repeat(once, seconds)
        rows.append(
            {
                "batch": batch,
                "images_per_s": round(batch / float(np.median(times)), 2),
                **milliseconds(times),
                "first_call_s": round(first, 3),
                "calls": len(times),
            }
        )
        print(f"  ideal batch {batch}: {rows[-1]['images_per_s']} images/s", flush=True)
    return rows


def precision(path: Path, device: str, images: np.ndarray, batch: int) -> list[dict]:
    from salience_server.devices import BFLOAT16, FLOAT16, Placement

    x = images[[k % len(images) for k in range(batch)]]
    variants = {
        "float32": Placement(device),
        "XLA": Placement(device, xla=True),
        "float16": Placement(device, compute_dtype=FLOAT16),
        "bfloat16": Placement(device, compute_dtype=BFLOAT16),
    }
    rows = []
    base_map = base_out = None
    for label, placement in variants.items():
        runtime = load_runtime(path, placement)
        start = time.perf_counter()
        result = runtime.explain([x], options())
        first = time.perf_counter() - start
        times = repeat(lambda r=runtime: r.explain([x], options()), 0.0, least=3)
        saliency = np.asarray(result.maps["absolute"], dtype=np.float64)
        out = np.asarray(result.outputs[0], dtype=np.float64)
        if base_map is None:
            base_map, base_out = saliency, out
        diff = np.abs(saliency - base_map)
        rows.append(
            {
                "variant": label,
                "batch": batch,
                "first_call_s": round(first, 3),
                "ms_per_image": round(1000 * statistics.median(times) / batch, 3),
                "map_max_abs_diff": float(diff.max()),
                "map_p99_abs_diff": float(np.percentile(diff, 99)),
                "map_mean_abs_diff": float(diff.mean()),
                # Per image, the least: a ReLU6 unit near a kink can flip and move a
                # region, which the differences show and the correlation weighs.
                "map_correlation_min": min(
                    float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
                    for a, b in zip(saliency, base_map, strict=True)
                ),
                "prediction_max_abs_diff": float(np.abs(out - base_out).max()),
                "top1_agreement": float(np.mean(out.argmax(-1) == base_out.argmax(-1))),
            }
        )
        print(f"  {label}: {rows[-1]['ms_per_image']} ms/image", flush=True)
    return rows


def tf_keras_vis(path: Path, runtime: Any, images: np.ndarray, seconds: float) -> dict:
    import keras
    import tensorflow as tf
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    with tf.device(runtime.placement.device):
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        saliency = Saliency(model, model_modifier=ReplaceToLinear(), clone=True)
        score = CategoricalScore(CLASS)
        k = iter(range(10**9))

        def theirs() -> np.ndarray:
            return np.asarray(saliency(score, images[next(k) % len(images)][None]))

        def ours() -> np.ndarray:
            return np.asarray(
                runtime.explain([images[next(k) % len(images)][None]], options()).maps["absolute"]
            )

        for fn in (theirs, ours):
            fn()  # warm-up: traces, kernels, allocator pools
        # Interleaved, so load from elsewhere hits both alike.
        their_times: list[float] = []
        our_times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(their_times) < 3:
            their_times += repeat(theirs, 0.0, least=1)
            our_times += repeat(ours, 0.0, least=1)
        want = np.asarray(saliency(score, images[:4]))
    got = runtime.explain([images[:4]], options()).maps["absolute"]
    correlation = min(
        float(np.corrcoef(got[i].ravel(), want[i].ravel())[0, 1]) for i in range(len(want))
    )
    theirs_ms = 1000 * statistics.median(their_times)
    ours_ms = 1000 * statistics.median(our_times)
    return {
        "tf_keras_vis_ms_per_request": round(theirs_ms, 3),
        "ours_ms_per_request": round(ours_ms, 3),
        "speed_up": round(theirs_ms / ours_ms, 2),
        "map_correlation_min": round(correlation, 4),
        "requests": len(their_times),
    }


# The service ---------------------------------------------------------------------


def scrape(server: ServerProcess) -> str:
    return server.metrics()


def metric(text: str, name: str, labels: str) -> float | None:
    found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def batch_totals(server: ServerProcess) -> tuple[float, float]:
    text = scrape(server)
    labels = f'model="{MODEL}"'
    return (
        metric(text, "salience_batch_size_sum", labels) or 0.0,
        metric(text, "salience_batch_size_count", labels) or 0.0,
    )


def device_memory(server: ServerProcess, device: str) -> dict[str, float] | None:
    text = scrape(server)
    stats = {
        stat: metric(text, "salience_device_memory_bytes", f'device="{device}",stat="{stat}"')
        for stat in ("current", "peak")
    }
    if all(v is None for v in stats.values()):
        return None
    return {k: v for k, v in stats.items() if v is not None}


def frontends_setting() -> bool:
    """Whether this server has a `--frontends` setting (several front-end processes)."""
    done = subprocess.run(
        [sys.executable, "-m", "salience_client.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "--frontends" in done.stdout


@contextmanager
def started(contexts: dict[str, AbstractContextManager[ServerProcess]]) -> Iterator[dict]:
    """Enters every server context at once (each loads and warms up its model in its
    own process) and leaves them all at the end.
    """
    with ExitStack() as stack, ThreadPoolExecutor(len(contexts)) as pool:
        futures = {name: pool.submit(c.__enter__) for name, c in contexts.items()}
        servers, failure = {}, None
        for name, future in futures.items():
            try:
                servers[name] = future.result()
                stack.push(contexts[name].__exit__)
            except BaseException as err:
                failure = failure or err
        if failure is not None:
            raise failure
        yield servers


def load(server: ServerProcess, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    from salience_client import bench

    before = batch_totals(server)
    figures = bench.run(
        bench.Load(
            target=server.target,
            rpc="explain",
            payloads=payloads,
            concurrency=concurrency,
            duration=seconds,
            warmup=concurrency,
            timeout=120.0,
        ),
        progress=False,
    )
    after = batch_totals(server)
    summary = figures.summary()
    calls = after[1] - before[1]
    return {
        "concurrency": concurrency,
        "images_per_s": summary["samples_per_s"],
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "requests": summary["requests"],
        "ok": summary["ok"],
        "errors": summary["errors"],
        # Warm-up requests count in the server's totals too: near enough for a mean.
        "mean_batch": round((after[0] - before[0]) / calls, 2) if calls else None,
    }


def service(args: argparse.Namespace, repo: Path, images: np.ndarray, device: str) -> dict:
    from salience_client import bench

    most = max(args.concurrency)
    flags = [
        "--device", args.device,
        "--max-device-batch-size", str(args.max_device_batch_size),
        "--max-queue-size", str(max(256, 2 * most)),
        "--max-concurrent-streams", str(max(1024, 2 * most)),
    ]  # fmt: skip
    configurations = {"on": flags, "off": [*flags, "--batching", "false"]}
    has_frontends = frontends_setting()
    if has_frontends:
        configurations["on, --frontends 1"] = [*flags, "--frontends", "1"]
        configurations[f"on, --frontends {args.frontends}"] = [
            *flags, "--frontends", str(args.frontends),
        ]  # fmt: skip
    payloads = bench.payloads(
        "explain", MODEL, images, 1, options={"filter_indices": [CLASS]}, distinct=DISTINCT
    )
    rows: list[dict] = []
    memory = None
    start = time.perf_counter()
    contexts = {name: salience_serve(repo, flags) for name, flags in configurations.items()}
    with started(contexts) as servers:
        ready_s = time.perf_counter() - start
        for c in args.concurrency:
            for name, server in servers.items():
                if "frontends" in name and c != most:
                    continue
                row = {"configuration": name, **load(server, payloads, c, args.window_s)}
                rows.append(row)
                print(
                    f"  {name} c={c}: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, "
                    f"batch {row['mean_batch']}",
                    flush=True,
                )
        memory = device_memory(servers["on"], device)
    return {
        "flags": flags,
        "configurations": list(configurations),
        "frontends_setting": has_frontends,
        "start_to_serving_s": round(ready_s, 2),
        "rows": rows,
        "device_memory_bytes": memory,
    }


# Putting it together -------------------------------------------------------------


def derive(figures: dict) -> dict:
    """The headline ratios, from the rows."""
    ideal_rows = {row["batch"]: row for row in figures["ideal"]}
    best = max(row["images_per_s"] for row in figures["ideal"])
    rows = figures["service"]["rows"]
    most = max(row["concurrency"] for row in rows)

    def at(name: str, c: int) -> dict | None:
        return next((r for r in rows if r["configuration"] == name and r["concurrency"] == c), None)

    on, off = at("on", most), at("off", most)
    on1 = at("on", min(row["concurrency"] for row in rows))
    derived: dict[str, Any] = {
        "max_concurrency": most,
        "best_ideal_images_per_s": best,
        "service_over_best_ideal": round(on["images_per_s"] / best, 4) if on else None,
        "batching_on_over_off": (
            round(on["images_per_s"] / off["images_per_s"], 3)
            if on and off and off["images_per_s"]
            else None
        ),
        "p50_c1_over_ideal_batch1_ms": (
            round(on1["p50_ms"] - ideal_rows[1]["p50_ms"], 3) if on1 and 1 in ideal_rows else None
        ),
        "tf_keras_vis_speed_up": figures["tf_keras_vis"]["speed_up"],
    }
    precision = {row["variant"]: row for row in figures["precision"]}
    for variant in ("XLA", "float16", "bfloat16"):
        row = precision.get(variant)
        if row:
            derived[f"{variant}_map_max_abs_diff"] = row["map_max_abs_diff"]
            derived[f"{variant}_map_correlation_min"] = round(row["map_correlation_min"], 5)
            derived[f"{variant}_speed_up"] = round(
                precision["float32"]["ms_per_image"] / row["ms_per_image"], 3
            )
    return derived


def describe_device(device: str) -> dict:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    details = []
    for gpu in gpus:
        try:
            info = tf.config.experimental.get_device_details(gpu)
        except (RuntimeError, ValueError):
            info = {}
        details.append({"name": gpu.name, **{k: str(v) for k, v in info.items()}})
    return {
        "setting": device,
        "tensorflow": tf.__version__,
        "gpus": details,
        "cuda_build": bool(tf.test.is_built_with_cuda()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from salience_server import devices
    from salience_server.settings import Settings

    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    placement = devices.configure(Settings(device=args.device))
    rng = np.random.default_rng(0)
    size = args.image_size
    images = rng.uniform(0, 1, (DISTINCT, size, size, 3)).astype(np.float32)
    figures: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in FULL} | {"rehearsal": args.rehearsal},
        "device": describe_device(args.device) | {"tensorflow_device": placement.device},
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-figures-"))
    try:
        import tensorflow as tf

        with tf.device(placement.device):
            model = build_model(args, images)
        path = work / MODEL / "1" / "model.keras"
        path.parent.mkdir(parents=True)
        model.save(path)
        figures["model"] = {
            "name": "MobileNetV2 (random weights, batch norms calibrated)",
            "input": [size, size, 3],
            "classes": args.classes,
            "alpha": args.alpha,
            "parameters": int(model.count_params()),
            "explanation": f"vanilla, absolute, filter_indices=[{CLASS}], one image per request",
        }
        del model
        seconds["model"] = time.perf_counter() - clock

        def phase(name: str, fn: Callable[[], Any]) -> None:
            print(f"{name} ...", flush=True)
            start = time.perf_counter()
            figures[name] = fn()
            seconds[name] = round(time.perf_counter() - start, 2)
            write(args.out, figures, seconds)  # what is done survives a later failure

        runtime = load_runtime(path, placement)
        phase("ideal", lambda: ideal(runtime, images, args.ideal_batches, args.ideal_s))
        phase("tf_keras_vis", lambda: tf_keras_vis(path, runtime, images, 2 * args.ideal_s))
        phase(
            "precision",
            lambda: precision(path, placement.device, images, args.precision_batch),
        )
        phase("service", lambda: service(args, work, images, placement.device))
        figures["derived"] = derive(figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = round(time.perf_counter() - clock, 2)
    write(args.out, figures, seconds)
    print(json.dumps(figures["derived"], indent=2))
    return 0


def write(out: Path, figures: dict, seconds: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**figures, "seconds": seconds}, indent=2, default=_plain)
    out.write_text(text + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON")


if __name__ == "__main__":
    sys.exit(main())
