"""A flood of silent TCP connections against `salience serve` (a real child
process started, as many systems start processes, with a soft open-files limit of
1024): Predicts from another client and the /metrics scrape still succeed while
the flood holds its connections open.

Before the fix, 3 000 silent connections took every descriptor of such a process:
the Predicts timed out and /metrics stopped answering until the flood closed. Now
the limit is raised to the hard one at start-up, connections are capped below it
with a reserve kept free, and silent ones are closed after the handshake timeout.
"""

from __future__ import annotations

import re
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from salience_client import SalienceClient
from tests.integration.models import LINEAR_SHAPE, build_repository
from tests.processes import salience_serve

FLOOD = 3000
START_LIMIT = 1024


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("flood-repo"))


@contextmanager
def silent_connections(target: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to `target` that never send a byte."""
    host, port = target.rsplit(":", 1)
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection((host, int(port)), timeout=30))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def test_a_flood_of_silent_connections_leaves_predict_and_metrics_working(repo: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 2 * START_LIMIT:
        pytest.skip(f"the hard open-files limit ({hard}) is too low for the flood")
    # This process holds the flood's sockets too.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    x = np.random.default_rng(0).uniform(size=(2, *LINEAR_SHAPE)).astype(np.float32)
    # Silent connections stay until the test ends them (not closed by the timeout).
    flags = ["--connection-handshake-timeout-seconds", "600"]
    try:
        with salience_serve(repo, flags, open_files=START_LIMIT) as server:
            limit = re.search(r"open-files limit (\d+) \(raised from (\d+)\)", server.text())
            assert limit is not None, server.text()
            assert int(limit.group(2)) == START_LIMIT
            with SalienceClient(server.target, timeout=30) as client:
                expected = client.predict("linear", x).outputs["logits"]
                with silent_connections(server.target, FLOOD):
                    # A new connection, made during the flood.
                    with SalienceClient(server.target, timeout=30, retry=None) as other:
                        for _ in range(5):
                            answer = other.predict("linear", x).outputs["logits"]
                            np.testing.assert_array_equal(answer, expected)
                    # And the connection opened before it.
                    np.testing.assert_array_equal(
                        client.predict("linear", x).outputs["logits"], expected
                    )
                    assert "salience_requests_total" in server.metrics()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
