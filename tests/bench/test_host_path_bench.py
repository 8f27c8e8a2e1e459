"""The host path against the floor of Python gRPC: what one request costs the server
beyond its model, as a multiple of what a bare `grpc.aio` handler costs.

    .venv/bin/pytest -m bench -s tests/bench/test_host_path_bench.py
    SALIENCE_BENCH_PROFILE=1 ...   # also sample the server with py-spy, print the top

One run, side by side, on the same payloads and concurrency (32 by default):

- floor: `floor_server.py`, a bare grpc.aio server that parses the same request
  bytes, decodes the input with `np.frombuffer` and answers with a reply of the same
  size (no interceptor, metrics, queue or model);
- service: `salience serve` on a repository of the demo `shapes` model and a
  MobileNetV2 at 224×224 (random weights), with every front end it is given
  (`SALIENCE_BENCH_FRONTENDS`, such as "1,2", when the server has `--frontends`);
- model: the compiled function alone, in this process, at the batch the service's
  device calls reached (`salience_batch_size` from its metrics): its CPU per image,
  times the rows the device computed per image (pad rows included, from
  `salience_padding_samples_total`): padding is device work, not host path.

Each figure is read from `/proc`: the CPU seconds (user + system) of the server's
whole process tree over a window, divided by the requests answered in it, so load
from other processes on a shared machine does not enter it (it does slow the
windows down alike). Windows of floor and service alternate for ROUNDS rounds; each
figure is the median of its rounds.

    overhead per request = service CPU per request − model CPU per image × images
    overhead ÷ floor     = overhead per request / floor CPU per request

Targets (printed, not asserted; timing is not a test): Predict overhead ≤ 2× the
floor, Explain ≤ 2.5× on `shapes`; MobileNetV2 Explain throughput ≥ 95 % of the
in-process ideal at concurrency 32.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.processes import ROOT, salience_serve

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("SALIENCE_BENCH_ROUNDS", "3"))
CONCURRENCY = int(os.environ.get("SALIENCE_BENCH_CONCURRENCY", "32"))
SCALE = float(os.environ.get("SALIENCE_BENCH_SCALE", "1"))
WINDOW_SECONDS = {"shapes": 4.0 * SCALE, "mobilenet": 12.0 * SCALE}
FRONTENDS = [int(n) for n in os.environ.get("SALIENCE_BENCH_FRONTENDS", "1").split(",") if n]
PROFILE = os.environ.get("SALIENCE_BENCH_PROFILE", "") not in ("", "0")
JSON_OUT = os.environ.get("SALIENCE_BENCH_JSON", "")
FLOOR_SERVER = Path(__file__).with_name("floor_server.py")
DISTINCT = 16
CASES = (("shapes", "predict"), ("shapes", "explain"), ("mobilenet", "explain"))
TARGETS = {"predict": 2.0, "explain": 2.5}
IDEAL_TARGET = 0.95
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# CPU of a process tree, from /proc -------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of one process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every process below it, as /proc has them now."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = found
    total = 0.0
    for pid, seconds in cpu.items():
        up = pid
        while up not in (root, 0, 1) and up in parents:
            up = parents[up]
        if up == root:
            total += seconds
    return total


def tree_cpu_by_pid(root: int) -> dict[int, float]:
    """CPU seconds of each process of `root`'s tree, as /proc has them now."""
    out = {}
    for pid in tree_pids(root):
        found = _stat(pid)
        if found is not None:
            out[pid] = found[1]
    return out


def frontend_pids(root: int) -> list[int]:
    """The front-end processes (`--frontends N`) below `root`."""
    found = []
    for pid in tree_pids(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"salience_server.procs.frontend" in command:
            found.append(pid)
    return found


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def tree_pids(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = found[0]
    out = []
    for pid in parents:
        up = pid
        while up not in (root, 0, 1) and up in parents:
            up = parents[up]
        if up == root:
            out.append(pid)
    return sorted(out)


# The servers -----------------------------------------------------------------------


@dataclass
class Target:
    """A server under load: where to dial it and the root of its process tree."""

    name: str
    target: str
    pid: int
    metrics_port: int | None = None

    def batch_totals(self, model: str) -> tuple[float, float, float]:
        """(samples, device calls, pad rows) so far, from the server's metrics (service
        only; a server without the padding counter reports 0 pad rows).
        """
        if self.metrics_port is None:
            return 0.0, 0.0, 0.0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        totals = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for kind in totals:
                if line.startswith(f'salience_batch_size_{kind}{{model="{model}"}}'):
                    totals[kind] = float(line.split()[-1])
            if line.startswith(f'salience_padding_samples_total{{model="{model}"}}'):
                totals["padding"] = float(line.split()[-1])
        return totals["sum"], totals["count"], totals.get("padding", 0.0)


@contextmanager
def floor_server(map_shape: tuple[int, ...], units: int) -> Iterator[Target]:
    with tempfile.TemporaryDirectory() as scratch:
        port_file = Path(scratch) / "port"
        shape = ",".join(map(str, map_shape))
        process = subprocess.Popen(
            [sys.executable, str(FLOOR_SERVER), str(port_file), "--map-shape", shape,
             "--output-units", str(units)],
            env={**os.environ, "PYTHONPATH": str(ROOT / "proto")},
        )  # fmt: skip
        try:
            end = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                assert process.poll() is None, "the floor server exited"
                assert time.monotonic() < end, "the floor server did not start"
                time.sleep(0.05)
            yield Target("floor", f"127.0.0.1:{port_file.read_text()}", process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_flags(frontends: int) -> list[str]:
    return ["--frontends", str(frontends)] if frontends != 1 else []


# Load and figures --------------------------------------------------------------------


@dataclass
class Window:
    requests: int
    cpu_seconds: float
    seconds: float
    p50_ms: float
    p99_ms: float
    owner_cpu_seconds: float = 0.0  # the serve process alone (the device owner)
    frontend_cpu_seconds: float = 0.0  # its front-end processes, together
    samples: float = 0.0  # device-call samples (service)
    calls: float = 0.0  # device calls (service)
    padding: float = 0.0  # pad rows computed with them (service)

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / max(self.requests, 1)

    @property
    def owner_ms_per_request(self) -> float:
        return 1000 * self.owner_cpu_seconds / max(self.requests, 1)

    @property
    def frontend_ms_per_request(self) -> float:
        return 1000 * self.frontend_cpu_seconds / max(self.requests, 1)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


@dataclass
class Series:
    windows: list[Window] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(w, attr) for w in self.windows)

    @property
    def mean_batch(self) -> float:
        calls = sum(w.calls for w in self.windows)
        return sum(w.samples for w in self.windows) / calls if calls else 0.0

    @property
    def padded_rows_per_sample(self) -> float:
        """Rows the device computed per real sample (1 + the padding's share)."""
        samples = sum(w.samples for w in self.windows)
        return 1 + sum(w.padding for w in self.windows) / samples if samples else 1.0


def load_window(
    server: Target, model: str, rpc: str, payloads: list[bytes], seconds: float
) -> Window:
    from salience_client import bench

    before_batch = server.batch_totals(model)
    before = tree_cpu_seconds(server.pid)
    by_pid = tree_cpu_by_pid(server.pid)
    result = bench.run(
        bench.Load(
            target=server.target,
            rpc=rpc,
            payloads=payloads,
            concurrency=CONCURRENCY,
            duration=seconds,
        ),
        progress=False,
    )
    cpu = tree_cpu_seconds(server.pid) - before
    by_pid_after = tree_cpu_by_pid(server.pid)
    frontends = set(frontend_pids(server.pid))
    frontend_cpu = sum(by_pid_after[p] - by_pid.get(p, 0.0) for p in frontends & set(by_pid_after))
    owner_cpu = by_pid_after.get(server.pid, 0.0) - by_pid.get(server.pid, 0.0)
    after_batch = server.batch_totals(model)
    assert result.codes == Counter({"OK": result.ok}), result.codes  # every request OK
    lat = np.asarray(result.ok_latencies) * 1000
    return Window(
        requests=result.ok,
        cpu_seconds=cpu,
        seconds=result.elapsed,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        owner_cpu_seconds=owner_cpu,
        frontend_cpu_seconds=frontend_cpu,
        samples=after_batch[0] - before_batch[0],
        calls=after_batch[1] - before_batch[1],
        padding=after_batch[2] - before_batch[2],
    )


def warm(server: Target, rpc: str, payloads: list[bytes]) -> None:
    from salience_client import bench

    bench.run(
        bench.Load(target=server.target, rpc=rpc, payloads=payloads, concurrency=CONCURRENCY,
                   requests=4 * CONCURRENCY),
        progress=False,
    )  # fmt: skip


def model_cpu_per_image(runtime: Any, rpc: str, samples: np.ndarray, batch: int) -> float:
    """CPU ms per image of the compiled predict (or default explanation) at `batch`."""
    from salience_server.explain.options import ExplainOptions

    x = samples[[k % len(samples) for k in range(batch)]]
    if rpc == "predict":

        def once() -> None:
            runtime.predict([x])
    else:
        plan = runtime.plan(ExplainOptions(), batch)

        def once() -> None:
            outputs, raw = runtime.compute(plan.graph, [x], plan.params)
            runtime.finish(plan, outputs, raw)

    for _ in range(3):
        once()
    repeats, start = 0, time.process_time()
    wall_end = time.perf_counter() + 2.0 * SCALE
    while time.perf_counter() < wall_end or repeats < 5:
        once()
        repeats += 1
    return 1000 * (time.process_time() - start) / (repeats * batch)


def ideal_throughput(runtime: Any, samples: np.ndarray, batch: int) -> float:
    """Images/s of compute + finish on one batch, in this process (explain)."""
    from salience_server.explain.options import ExplainOptions

    x = samples[[k % len(samples) for k in range(batch)]]
    plan = runtime.plan(ExplainOptions(), batch)
    outputs, raw = runtime.compute(plan.graph, [x], plan.params)
    runtime.finish(plan, outputs, raw)
    times = []
    end = time.perf_counter() + 4.0 * SCALE
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        outputs, raw = runtime.compute(plan.graph, [x], plan.params)
        runtime.finish(plan, outputs, raw)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def bucket(batch: float) -> int:
    return int(2 ** np.ceil(np.log2(max(batch, 1.0))))


# Profiles ----------------------------------------------------------------------------


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling every process of the server for `seconds` (None: no py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("  (py-spy is not installed: no profile)")
        return None
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--subprocesses", "--duration", str(int(seconds)),
         "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def profile_top(path: Path, count: int = 14) -> list[str]:
    """The functions with the most samples of their own (self) and in total."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f.strip() for f in stack.split(";")[1:]]  # [0] is the thread/process
        if not frames:
            continue
        weight = int(n)
        samples += weight
        own[frames[-1]] += weight
        for frame in set(frames):
            total[frame] += weight
    lines = [f"  py-spy: {samples} samples; self / inclusive share of the server's samples"]
    for label, counter in (("self", own), ("inclusive", total)):
        lines.append(f"  top {label}:")
        for frame, n in counter.most_common(count):
            lines.append(f"    {100 * n / max(samples, 1):5.1f}%  {frame[:110]}")
    return lines


# The benchmark -----------------------------------------------------------------------


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_host_path_against_the_floor(frontends: int, repo: Path, tmp_path: Path) -> None:
    from salience_client import bench
    from salience_server.runtime import ModelRuntime

    figures: dict[str, Any] = {"frontends": frontends, "concurrency": CONCURRENCY, "cases": {}}
    lines = [f"\nhost path, concurrency {CONCURRENCY}, {frontends} front end(s), "
             f"median of {ROUNDS} rounds"]  # fmt: skip
    with salience_serve(repo, serve_flags(frontends)) as s:
        service = Target("service", s.target, s.process.pid, s.metrics_port)
        for model, rpc in CASES:
            runtime = ModelRuntime.load(model, 1, repo / model / "1" / "model.keras")
            info = runtime.inputs[0]
            shape = [int(d) for d in info.shape[1:]]
            samples = bench.random_samples(np.dtype(info.dtype), shape, DISTINCT, seed=0)
            payloads = bench.payloads(rpc, model, samples, 1)
            units = int(runtime.outputs[0].shape[-1] or 1)
            map_shape = (1, *shape[:-1])
            seconds = WINDOW_SECONDS[model]
            series = {"floor": Series(), "service": Series()}
            spy = None
            with floor_server(map_shape, units) as floor:
                servers = {"floor": floor, "service": service}
                for server in servers.values():
                    warm(server, rpc, payloads)
                for r in range(ROUNDS):
                    for name, server in servers.items():
                        if PROFILE and name == "service" and r == ROUNDS - 1:
                            out = tmp_path / f"{model}-{rpc}.txt"
                            spy = (profile(server.pid, seconds, out), out)
                        series[name].windows.append(
                            load_window(server, model, rpc, payloads, seconds)
                        )
            batch = bucket(series["service"].mean_batch)
            # The model's CPU per request counts the pad rows its calls computed too
            # (device work, not host path): per padded row at the bucket × rows per image.
            padded = series["service"].padded_rows_per_sample
            model_ms = model_cpu_per_image(runtime, rpc, samples, batch) * padded
            floor_ms = series["floor"].median("cpu_ms_per_request")
            service_ms = series["service"].median("cpu_ms_per_request")
            overhead = service_ms - model_ms
            ratio = overhead / floor_ms
            case: dict[str, Any] = {
                "floor_cpu_ms": floor_ms,
                "service_cpu_ms": service_ms,
                "model_cpu_ms_per_image": model_ms,
                "model_batch": batch,
                "padded_rows_per_image": padded,
                "mean_batch": series["service"].mean_batch,
                "overhead_ms": overhead,
                "overhead_over_floor": ratio,
            }
            for name, s_ in series.items():
                case[f"{name}_requests_per_s"] = s_.median("throughput")
                case[f"{name}_p50_ms"] = s_.median("p50_ms")
                case[f"{name}_p99_ms"] = s_.median("p99_ms")
            lines += [
                f"{model} {rpc}:",
                f"  floor    {floor_ms:6.3f} ms CPU/request  "
                f"{case['floor_requests_per_s']:8.1f} req/s  p50 {case['floor_p50_ms']:7.2f}  "
                f"p99 {case['floor_p99_ms']:7.2f} ms",
                f"  service  {service_ms:6.3f} ms CPU/request  "
                f"{case['service_requests_per_s']:8.1f} req/s  p50 {case['service_p50_ms']:7.2f}  "
                f"p99 {case['service_p99_ms']:7.2f} ms  (device calls of {case['mean_batch']:.1f})",
                f"  model    {model_ms:6.3f} ms CPU/image at batch {batch} "
                f"({padded:.2f} rows computed per image, padding included)",
                f"  overhead {overhead:6.3f} ms/request = {ratio:.2f}x the floor "
                f"(target <= {TARGETS[rpc]:g}x: {'met' if ratio <= TARGETS[rpc] else 'missed'})",
            ]
            service_series = series["service"]
            case["owner_cpu_ms"] = service_series.median("owner_ms_per_request")
            if frontends > 1:
                fe_ms = service_series.median("frontend_ms_per_request")
                pids = frontend_pids(service.pid)
                rss = max(rss_bytes(p) for p in pids) if pids else 0
                case["frontend_cpu_ms"] = fe_ms
                case["frontend_rss_bytes"] = rss
                case["frontend_requests_per_core_s"] = 1000 / fe_ms if fe_ms else 0.0
                lines.append(
                    f"  processes: owner {case['owner_cpu_ms']:.3f} ms CPU/request, "
                    f"front ends {fe_ms:.3f} ms CPU/request (all {len(pids)} together); "
                    f"a front end's RSS {rss / 2**20:.0f} MiB; front-end capacity "
                    f"{case['frontend_requests_per_core_s']:.0f} requests/s per core"
                )
            else:
                lines.append(
                    f"  processes: one, {case['owner_cpu_ms']:.3f} ms CPU/request; its RSS "
                    f"{rss_bytes(service.pid) / 2**20:.0f} MiB"
                )
            if model == "mobilenet":
                ideal = ideal_throughput(runtime, samples, batch)
                share = case["service_requests_per_s"] / ideal
                case["ideal_images_per_s"] = ideal
                case["service_over_ideal"] = share
                lines.append(
                    f"  in-process ideal at batch {batch}: {ideal:.1f} images/s; service/ideal "
                    f"{share:.1%} (target >= {IDEAL_TARGET:.0%}: "
                    f"{'met' if share >= IDEAL_TARGET else 'missed'})"
                )
            if spy is not None and spy[0] is not None:
                spy[0].wait(60)
                if spy[1].exists():
                    lines += profile_top(spy[1])
            figures["cases"][f"{model}-{rpc}"] = case
            del runtime
    for line in lines:
        print(line)
    if JSON_OUT:
        path = Path(JSON_OUT)
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing[f"frontends-{frontends}"] = figures
        path.write_text(json.dumps(existing, indent=2))
    assert all(c["service_cpu_ms"] > 0 and c["floor_cpu_ms"] > 0 for c in figures["cases"].values())
