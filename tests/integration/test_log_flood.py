"""A flood of unauthenticated calls against `salience serve` (a real child process,
its real stderr): the log holds a bounded number of refusal lines and a count of
those left out, instead of one WARNING per call (485 KiB/s under the flood that
found it).
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from tests.integration.models import LINEAR_SHAPE, build_repository
from tests.processes import salience_serve

CALLS = 300
BURST = 5
TOKEN = "log-flood-token-0123456789abcdef"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("log-flood-repo"))


def test_a_flood_of_unauthenticated_calls_writes_a_bounded_log(repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    flags = [
        "--auth-token-file", str(tokens), "--log-repeat-burst", str(BURST),
        # One window for the whole test: the summary comes at exit.
        "--log-repeat-window-seconds", "3600",
    ]  # fmt: skip
    x = np.zeros((1, *LINEAR_SHAPE), np.float32)
    request = pb.PredictRequest(model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(x)])
    with salience_serve(repo, flags) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = salience_pb2_grpc.SalienceStub(channel)
            codes = set()
            for _ in range(CALLS):
                try:
                    stub.Predict(request, timeout=30)
                except grpc.RpcError as err:
                    codes.add(err.code())
            # The token still lets a caller in.
            answer = stub.Predict(
                request, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")]
            )
            assert answer.outputs
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(120) == 0
    lines = server.text().splitlines()
    refused = [line for line in lines if "refused /salience.v1.Salience/Predict from" in line]
    assert len(refused) == BURST
    summaries = [line for line in lines if "were not logged" in line]
    assert summaries == [
        summaries[0].split(" WARNING ")[0]
        + f' WARNING salience_server.security: {CALLS - BURST} more like "refused %s from %s: '
        '%s" in the last 3600 s were not logged'
    ]
