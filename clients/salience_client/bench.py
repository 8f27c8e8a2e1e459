"""`salience bench`: a load generator that measures a server's throughput and latency.

    salience bench --model shapes --rpc explain --concurrency 32 --duration 20
    salience bench --model shapes --rate 200 --requests 2000 --json cat.png
    salience bench --model shapes --rpc oip-infer --concurrency 8 --duration 20

Closed loop (the default): `--concurrency` callers each send their next request as
soon as the previous one is answered. Open loop (`--rate R`): a request starts
every 1/R seconds whatever happens to the earlier ones, and its latency counts
from when it was due, so a server that falls behind shows it in the tail instead
of slowing the generator down with it.

The generator must never be what limits the figures: requests are serialised once
before the run and sent as bytes over one `grpc.aio` channel, responses are
counted, not decoded, and no thread is involved — one event loop keeps 32 calls in
flight with a fraction of a core.

`--rpc oip-infer` sends the Open Inference Protocol's ModelInfer (raw input bytes,
every model output, no saliency map) to the same server, so both APIs' overhead on
one model can be measured side by side against `--rpc predict`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc import aio

from inference.v2 import grpc_service_pb2 as oip
from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.channel import ChannelConfig
from salience_client.messages import explanation_request

PREDICT = "predict"
EXPLAIN = "explain"
OIP_INFER = "oip-infer"
RPCS = (PREDICT, EXPLAIN, OIP_INFER)
METHODS = {
    PREDICT: "/salience.v1.Salience/Predict",
    EXPLAIN: "/salience.v1.Salience/Explain",
    OIP_INFER: "/inference.GRPCInferenceService/ModelInfer",
}
# The Open Inference Protocol's datatype of each numpy dtype the samples may have.
OIP_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
# Distinct requests cycled through; enough that no cache could notice repeats.
DISTINCT_REQUESTS = 16
PROGRESS_SECONDS = 0.25


@dataclass(frozen=True)
class Load:
    """What to send, how hard, and for how long (one of duration or requests)."""

    target: str
    rpc: str
    payloads: Sequence[bytes]
    samples_per_request: int = 1
    concurrency: int = 1
    duration: float | None = None
    requests: int | None = None
    rate: float | None = None
    timeout: float = 60.0
    warmup: int = 0
    # TLS and token as the clients take them; None is plaintext without a token.
    # Never with retries: a load test counts each refusal the server sends.
    channel: ChannelConfig | None = None

    def __post_init__(self) -> None:
        if self.rpc not in RPCS:
            raise ValueError(f"rpc={self.rpc!r} is not one of {', '.join(RPCS)}")
        if (self.duration is None) == (self.requests is None):
            raise ValueError("give exactly one of duration and requests")
        if not self.payloads:
            raise ValueError("no request to send")
        if self.channel is not None and self.channel.retry is not None:
            raise ValueError("a load test's channel must not retry: pass retry=None")


@dataclass
class BenchResult:
    """Figures of one run; latencies in seconds, of answered requests of any status."""

    rpc: str
    concurrency: int
    rate: float | None
    samples_per_request: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def ok(self) -> int:
        return self.codes.get(grpc.StatusCode.OK.name, 0)

    def latency_ms(self) -> dict[str, float]:
        """p50, p90, p99, max and mean of the answered-OK latencies in milliseconds,
        unrounded (empty when none succeeded): the text, the plot and the JSON all
        start from these values.
        """
        lat = np.asarray(self.ok_latencies, dtype=np.float64) * 1000.0
        if not lat.size:
            return {}
        found = {f"p{q:g}": float(np.percentile(lat, q)) for q in PLOT_PERCENTILES}
        return {**found, "max": float(lat.max()), "mean": float(lat.mean())}

    def summary(self) -> dict[str, Any]:
        """The figures as JSON-ready values (`salience bench --json`)."""
        elapsed = max(self.elapsed, 1e-9)
        figures = self.latency_ms()

        def ms(name: str) -> float | None:
            return round(figures[name], 3) if figures else None

        return {
            "rpc": self.rpc,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "batch": self.samples_per_request,
            "duration_s": round(self.elapsed, 3),
            "requests": self.requests,
            "ok": self.ok,
            "samples": self.ok * self.samples_per_request,
            "requests_per_s": round(self.ok / elapsed, 3),
            "samples_per_s": round(self.ok * self.samples_per_request / elapsed, 3),
            "latency_ms": {name: ms(name) for name in ("p50", "p90", "p99", "max", "mean")},
            "errors": {
                code: n for code, n in sorted(self.codes.items()) if code != grpc.StatusCode.OK.name
            },
        }

    def format(self) -> list[str]:
        """The figures for a person."""
        s = self.summary()
        lat = self.latency_ms()
        mode = f"open loop at {self.rate:g}/s" if self.rate else f"concurrency {self.concurrency}"
        lines = [
            f"{s['rpc']}: {s['requests']} requests in {s['duration_s']:.2f} s ({mode}, "
            f"{self.samples_per_request} sample{'s' if self.samples_per_request != 1 else ''} "
            "per request)",
            f"throughput  {s['requests_per_s']:.1f} requests/s, {s['samples_per_s']:.1f} samples/s"
            f" ({s['ok']} ok)",
        ]
        if lat:
            lines.append(
                "latency ms  "
                + "  ".join(
                    f"{name} {format_ms(lat[name])}" for name in ("p50", "p90", "p99", "max")
                )
            )
        else:
            lines.append("latency ms  no request succeeded")
        errors = s["errors"]
        if errors:
            lines.append("errors      " + ", ".join(f"{code} {n}" for code, n in errors.items()))
        else:
            lines.append("errors      none")
        return lines


# Requests ------------------------------------------------------------------------


def random_samples(dtype: np.dtype, shape: Sequence[int], count: int, seed: int = 0) -> np.ndarray:
    """`count` samples: floats uniform in [0, 1), uint8 in 0..255, other integers 0 or 1."""
    rng = np.random.default_rng(seed)
    full = (count, *shape)
    if dtype.kind == "f":
        return rng.random(full, dtype=np.float64).astype(dtype)
    if dtype == np.uint8:
        return rng.integers(0, 256, full).astype(dtype)
    if dtype.kind in "iub":
        return rng.integers(0, 2, full).astype(dtype)
    raise ValueError(f"cannot make random samples of dtype {dtype}")


def payloads(
    rpc: str,
    model: str,
    samples: np.ndarray,
    batch: int,
    *,
    version: int = 0,
    options: dict[str, Any] | None = None,
    distinct: int = DISTINCT_REQUESTS,
    input_name: str = "",
) -> list[bytes]:
    """Serialised requests of `batch` consecutive samples each, cycling over `samples`.

    `input_name` names the model's input in ModelInfer requests (OIP_INFER).
    """
    n = len(samples)
    count = max(1, min(distinct, math.ceil(n / batch)))
    out = []
    for k in range(count):
        rows = samples[[(k * batch + j) % n for j in range(batch)]]
        if rpc == PREDICT:
            request: Any = pb.PredictRequest(
                model=pb.ModelSpec(name=model, version=version), inputs=[tensors.encode(rows)]
            )
        elif rpc == OIP_INFER:
            request = oip_infer_request(model, rows, version=version, input_name=input_name)
        else:
            request = explanation_request(model, rows, version=version, **(options or {}))
        out.append(request.SerializeToString())
    return out


def oip_infer_request(
    model: str, rows: np.ndarray, *, version: int = 0, input_name: str = ""
) -> oip.ModelInferRequest:
    """A ModelInfer request of one input's rows, as raw little-endian bytes (as
    Triton's client sends them), asking for every model output.
    """
    try:
        datatype = OIP_DATATYPES[rows.dtype.name]
    except KeyError:
        raise ValueError(f"samples of dtype {rows.dtype} have no datatype to send") from None
    request = oip.ModelInferRequest(model_name=model, model_version=str(version) if version else "")
    request.inputs.add(name=input_name, datatype=datatype, shape=list(rows.shape))
    little = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    request.raw_input_contents.append(little.tobytes())
    return request


# The load ------------------------------------------------------------------------


def _code(err: BaseException) -> str:
    if isinstance(err, aio.AioRpcError):
        return str(err.code().name)
    if isinstance(err, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.UNKNOWN.name


class _Progress:
    """A tqdm bar on stderr, updated a few times a second (never per request)."""

    def __init__(self, load: Load, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            if load.requests is not None:
                self._bar = tqdm(total=load.requests, unit="req", disable=None, leave=False)
            else:
                self._bar = tqdm(
                    total=round(load.duration or 0, 1),
                    unit="s",
                    disable=None,
                    leave=False,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix}",
                )
        self._by_requests = load.requests is not None

    def update(self, done: int, errors: int, elapsed: float) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.n = done if self._by_requests else min(round(elapsed, 1), bar.total)
        bar.set_postfix_str(f"{done} done, {errors} errors", refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _run(load: Load, progress: bool) -> BenchResult:
    config = load.channel or ChannelConfig(load.target, retry=None)
    metadata = config.call_metadata()
    async with config.open_aio() as channel:
        # No serialisers: the payloads are bytes already, and answers stay bytes.
        call = channel.unary_unary(METHODS[load.rpc])
        result = BenchResult(
            rpc=load.rpc,
            concurrency=load.concurrency,
            rate=load.rate,
            samples_per_request=load.samples_per_request,
            elapsed=0.0,
        )
        payloads = load.payloads

        async def send(k: int, due: float, record: bool) -> None:
            try:
                await call(payloads[k % len(payloads)], timeout=load.timeout, metadata=metadata)
                code = grpc.StatusCode.OK.name
            except (TimeoutError, aio.AioRpcError) as err:
                code = _code(err)
            if record:
                latency = time.perf_counter() - due
                result.latencies.append(latency)
                if code == grpc.StatusCode.OK.name:
                    result.ok_latencies.append(latency)
                result.codes[code] += 1

        if load.warmup:
            await asyncio.gather(*(send(k, time.perf_counter(), False) for k in range(load.warmup)))

        bar = _Progress(load, progress)
        start = time.perf_counter()
        end = start + load.duration if load.duration is not None else math.inf
        limit = load.requests if load.requests is not None else math.inf
        started = 0

        async def ticker() -> None:
            while True:
                bar.update(
                    result.requests, result.requests - result.ok, time.perf_counter() - start
                )
                await asyncio.sleep(PROGRESS_SECONDS)

        ticking = asyncio.create_task(ticker())
        try:
            if load.rate:
                interval = 1.0 / load.rate
                tasks: set[asyncio.Task[None]] = set()
                while started < limit:
                    due = start + started * interval
                    if due >= end:
                        break
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(send(started, due, True))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    started += 1
                if tasks:
                    await asyncio.gather(*tasks)
            else:

                async def caller() -> None:
                    nonlocal started
                    while started < limit and time.perf_counter() < end:
                        k = started
                        started += 1
                        await send(k, time.perf_counter(), True)

                await asyncio.gather(*(caller() for _ in range(load.concurrency)))
        finally:
            result.elapsed = time.perf_counter() - start
            ticking.cancel()
            bar.update(result.requests, result.requests - result.ok, result.elapsed)
            bar.close()
        return result


def run(load: Load, progress: bool = True) -> BenchResult:
    """Runs a load to its end and returns its figures (blocking)."""
    return asyncio.run(_run(load, progress))


async def run_async(load: Load, progress: bool = False) -> BenchResult:
    """`run` for callers that already have an event loop."""
    return await _run(load, progress)


# The plot ------------------------------------------------------------------------

PLOT_PERCENTILES = (50.0, 90.0, 99.0)
# Labelled ticks on the histogram's log axis.
HISTOGRAM_TICKS = 5


def format_ms(value: float) -> str:
    """A latency in milliseconds as the text and the plot both print it."""
    return f"{value:.2f}"


def log_ticks(low: float, high: float, count: int = HISTOGRAM_TICKS) -> list[float]:
    """At most about `count` round values spread evenly on a log scale over [low,
    high]: powers of ten over two decades or more, else values with as few
    significant digits as keep them distinct.
    """
    first, last = math.ceil(math.log10(low)), math.floor(math.log10(high))
    if last - first >= 2:  # two decades or more: powers of ten, every k-th
        step = math.ceil((last - first + 1) / count)
        return [10.0**k for k in range(first, last + 1, step)]
    spread = np.geomspace(low, high, count)
    for digits in range(1, 8):
        ticks = sorted({float(f"{v:.{digits}g}") for v in spread})
        if len(ticks) == count:
            break
    return [t for t in ticks if low <= t <= high] or [float(f"{low:.3g}")]


def plot(result: BenchResult, path: Any) -> Any:
    """Draws the latency distribution of the answered-OK requests to a PNG at `path`:
    a histogram on log-spaced bins and the percentile curve with p50/p90/p99 marked.
    Returns the matplotlib Figure (its axes hold exactly the plotted values).
    """
    # A Figure without pyplot: no GUI backend, no global state, safe in any thread.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figures = result.latency_ms()
    lat = np.sort(np.asarray(result.ok_latencies, dtype=np.float64) * 1000.0)
    summary = result.summary()
    mode = f"open loop {result.rate:g}/s" if result.rate else f"concurrency {result.concurrency}"
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    figure.suptitle(
        f"{result.rpc}: {summary['ok']} ok of {summary['requests']} requests, {mode}, "
        f"{summary['requests_per_s']:.1f} requests/s"
    )
    hist, curve = figure.subplots(1, 2)
    if lat.size:
        # Log-spaced bins: latencies span a cached millisecond to a queued second.
        low, high = max(lat[0], 1e-3), max(lat[-1], lat[0] * 1.01, 1e-3 * 1.01)
        bins = np.geomspace(low, high, 40)
        hist.hist(np.clip(lat, low, high), bins=bins, color="tab:blue")
        hist.set_xscale("log")
        # Plain numbers a few at a time: a log axis inside one decade labels every
        # minor tick as 4.7×10¹, 4.8×10¹..., which crowd into each other.
        ticks = log_ticks(low, high)
        hist.set_xticks(ticks, [f"{t:g}" for t in ticks])
        hist.xaxis.set_minor_formatter(NullFormatter())
        ranks = 100.0 * (np.arange(lat.size) + 1) / lat.size
        curve.plot(ranks, lat, color="tab:blue")
        for q, colour in zip(PLOT_PERCENTILES, ("tab:green", "tab:orange", "tab:red"), strict=True):
            value = figures[f"p{q:g}"]
            label = f"p{q:g} {format_ms(value)} ms"
            curve.axhline(value, color=colour, linestyle="--", label=label)
            hist.axvline(value, color=colour, linestyle="--")
        curve.legend(loc="upper left")
    else:
        hist.text(0.5, 0.5, "no request succeeded", ha="center", transform=hist.transAxes)
    hist.set_xlabel("latency (ms)")
    hist.set_ylabel("requests")
    hist.set_title("latency histogram")
    curve.set_xlabel("percentile")
    curve.set_ylabel("latency (ms)")
    curve.set_title("latency by percentile")
    figure.savefig(path, format="png")
    return figure
