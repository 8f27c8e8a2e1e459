"""`salience serve` as a real child process, for tests that need real signals, an
exit status or the process's own memory: started on free ports, yielded once it
logs that it serves, and stopped (SIGTERM, or kill) when the block ends.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240.0
SERVING_LINE = re.compile(r"serving .* on 127\.0\.0\.1:(\d+)")
METRICS_LINE = re.compile(r"metrics on (\d+)")


@dataclass
class ServerProcess:
    """A started server: its process, the target to dial, its /metrics port and the
    lines it has logged so far (stderr, read all along).
    """

    process: subprocess.Popen[str]
    target: str
    metrics_port: int
    log: list[str]

    def text(self) -> str:
        """Everything it has logged so far."""
        return "".join(self.log)

    def metrics(self) -> str:
        """The text of its /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=30).read().decode())

    def rss_bytes(self) -> int:
        """Its resident set size, from /proc/<pid>/status."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert found is not None, status
        return int(found.group(1)) * 1024


@contextmanager
def salience_serve(
    repo: Path, flags: Sequence[str] = (), *, stop: str = "term", open_files: int | None = None
) -> Iterator[ServerProcess]:
    """`salience serve` on `repo` with `flags`, from the checkout (so that plugin
    modules of the test package import). `stop` is how a still-running process ends
    with the block: "term" (SIGTERM, its graceful shutdown) or "kill". `open_files`
    starts it with that soft open-files limit (the hard one unchanged), as systems
    that start processes at 1024 do.
    """
    command = [
        sys.executable, "-m", "salience_client.cli", "serve",
        "--model-repository", str(repo), "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--repository-poll-seconds", "0",
        "--frontends", os.environ.get("SALIENCE_TEST_FRONTENDS", "1"), *flags,
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)

    def limit() -> None:
        if open_files is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=limit if open_files is not None else None,
    )
    log: list[str] = []
    stream = process.stderr
    assert stream is not None

    def read() -> None:
        # Drained all along: a full pipe would block the server's logging.
        for line in stream:
            log.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        end = time.monotonic() + START_TIMEOUT_S
        port = metrics_port = None
        while port is None:
            assert process.poll() is None, "salience serve exited:\n" + "".join(log)
            assert time.monotonic() < end, "salience serve did not start:\n" + "".join(log)
            time.sleep(0.1)
            for line in list(log):
                if found := METRICS_LINE.search(line):
                    metrics_port = int(found.group(1))
                if found := SERVING_LINE.search(line):
                    port = int(found.group(1))
        assert metrics_port is not None
        yield ServerProcess(process, f"127.0.0.1:{port}", metrics_port, log)
    finally:
        if process.poll() is None and stop == "term":
            process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                process.wait(120)
        if process.poll() is None:
            process.kill()
            process.wait(60)
