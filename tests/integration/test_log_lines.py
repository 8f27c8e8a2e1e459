"""One logging set-up, one line each: `salience serve` (a real child process, its real
stderr) writes TensorFlow's native start-up lines and its retracing warning once each,
in the server's format, never again in TensorFlow's own.
"""

from __future__ import annotations

import logging
import platform
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from salience_server.demo import bundled_repository
from salience_server.logs import parse_native
from tests.processes import salience_serve

# A line of the server's format: "2026-12-04 19:04:38,029 WARNING tensorflow: ...".
OURS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (\S+): (.*)$")
ONEDNN = "oneDNN custom operations are on"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("log-lines")
    shutil.copytree(bundled_repository() / "shapes", root / "shapes")
    return root


def test_tensorflow_lines_are_written_once_in_the_servers_format(repo: Path) -> None:
    from salience_client import SalienceClient

    with salience_serve(repo) as server, SalienceClient(server.target) as client:
        # As an audit does: explanations of many layers, each a function of its
        # own, until TensorFlow warns of retracing.
        x = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
        layers = [
            layer.name
            for layer in client.metadata("shapes").layers[1:]
            if len(layer.output_shape) in (2, 4)
        ]
        assert len(layers) >= 6, layers
        for name in layers:
            client.explain("shapes", x, layer=name, filter_indices=[0])
    lines = "".join(server.log).splitlines()
    ours = [OURS.match(line) for line in lines]
    # Every line is the server's (continuations of a multi-line message aside):
    # none in TensorFlow's Python format nor natively, no absl notice.
    for line in lines:
        assert not line.startswith(("WARNING:tensorflow", "INFO:tensorflow", "ERROR:tensorflow"))
        assert not re.match(r"^[IWEF]\d{4} ", line), line
        assert "absl::InitializeLog" not in line, line
    from_tf = [m.group(2) for m in ours if m is not None and m.group(1) == "tensorflow"]
    retracing = [m for m in from_tf if "triggered tf.function retracing" in m]
    assert retracing, "the layers did not make TensorFlow warn of retracing:\n" + "\n".join(lines)
    repeated = {m: n for m, n in Counter(from_tf).items() if n > 1}
    assert not repeated, repeated
    onednn = [m for m in from_tf if ONEDNN in m]
    # TensorFlow's x86-64 Linux builds turn oneDNN on and say so, once per library.
    expected = 1 if platform.machine() == "x86_64" else len(onednn)
    assert len(onednn) == expected <= 1, from_tf


def test_native_lines_are_parsed_once_each_with_their_level() -> None:
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1796410725.579148   17356 port.cc:153] oneDNN custom operations are on.\n"
        "W0000 00:00:1796410725.600000   17356 cpu_feature_guard.cc:227] optimized for AVX2\n"
        "To enable them, rebuild TensorFlow.\n"
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1796410734.032753   17356 port.cc:153] oneDNN custom operations are on.\n"
    )
    assert parse_native(text) == [
        (logging.INFO, "port.cc:153] oneDNN custom operations are on."),
        (
            logging.WARNING,
            "cpu_feature_guard.cc:227] optimized for AVX2\nTo enable them, rebuild TensorFlow.",
        ),
    ]
    assert parse_native("a stray line\n") == [(logging.WARNING, "a stray line")]
