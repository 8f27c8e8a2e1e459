"""The README's command-line examples run as written, by copy and paste, against a
real server with the bundled demo models, `SALIENCE_TARGET` set once as the README
says; what they print and draw is what the README shows.

Every shell block the README marks with CLI_MARKER is run whole, by bash with
`set -e`, in a fresh directory that holds only links to `docs/`, `tests/` and the
virtual environment (so the examples write there, never over a tracked file). A
shell block that calls the client and is not marked fails the test: no example is
left out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CLI_MARKER = "<!-- cli-example: tests/e2e/test_readme_cli.py runs this block"
EXPORT = re.compile(r"^export SALIENCE_TARGET=(\S+)$", re.MULTILINE)
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
BLOCK_TIMEOUT_S = 900


def readme_blocks() -> list[tuple[bool, str, str, str]]:
    """Every fenced block as (marked, language, text, the block right after it)."""
    text = README.read_text(encoding="utf-8")
    blocks = list(BLOCK.finditer(text))
    found = []
    for k, block in enumerate(blocks):
        before = text[: block.start()].rstrip().rsplit("\n", 1)[-1]
        after = ""
        if k + 1 < len(blocks):
            between = text[block.end() : blocks[k + 1].start()]
            if not between.strip() and blocks[k + 1].group(1) == "":
                after = blocks[k + 1].group(2)
        found.append((before.startswith(CLI_MARKER), block.group(1), block.group(2), after))
    return found


def examples() -> list[tuple[str, str]]:
    return [(text, after) for marked, _, text, after in readme_blocks() if marked]


def test_the_readme_sets_the_target_once_and_every_client_example_is_run() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(EXPORT.findall(text)) == 1, "set SALIENCE_TARGET once, in the first call"
    marked = examples()
    assert len(marked) >= 5
    assert EXPORT.search(marked[0][0]) is not None
    for marked_block, language, block, _ in readme_blocks():
        calls_client = re.search(r"(^|\s)(\.venv/bin/)?salience (?!serve)", block, re.M)
        if language in ("sh", "bash") and calls_client:
            assert marked_block, f"a client example the README test does not run:\n{block}"
    for block, _ in marked:
        assert "--target" not in block, block
        assert "localhost:50051" not in EXPORT.sub("", block), block
        for line in block.splitlines():
            if "salience " in line and not line.lstrip().startswith("#"):
                assert line.lstrip().startswith(".venv/bin/"), f"not as installed: {line}"


@pytest.fixture(scope="module")
def ran(demo_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs every marked example in order in one scratch directory."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "salience").exists():
        pytest.skip(f"no salience entry point in {venv}: install the package first")
    served = demo_server  # the bundled demo models
    work = tmp_path_factory.mktemp("readme")
    for name, target in (("docs", ROOT / "docs"), ("tests", ROOT / "tests"), (".venv", venv)):
        (work / name).symlink_to(target, target_is_directory=True)
    env = {**os.environ, "SALIENCE_TARGET": served.target}
    env.pop("MPLBACKEND", None)
    results = []
    for block, after in examples():
        # The reader's own export names their server; this run's is in the environment.
        script = "set -euo pipefail\n" + EXPORT.sub("", block)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert done.returncode == 0, (
            f"{block}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        assert "Traceback" not in done.stderr, done.stderr
        results.append((block, after, done))
    return {"work": work, "results": results}


def test_every_example_prints_what_the_readme_shows(ran: dict[str, Any]) -> None:
    shown = [(block, after, done) for block, after, done in ran["results"] if after]
    assert len(shown) >= 2  # the first call and the review
    for block, after, done in shown:
        assert done.stdout == after, f"{block}\nprinted:\n{done.stdout}\nREADME shows:\n{after}"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(np.int16)


def test_the_overlays_are_the_readme_pictures(ran: dict[str, Any]) -> None:
    work: Path = ran["work"]
    pairs = [("overlays/triangle_absolute.png", "triangle_absolute.png")] + [
        (f"steering/road_{name}.png", f"road_{name}.png")
        for name in ("none", "negate", "small_values")
    ]
    for drawn, pictured in pairs:
        got, shown = _pixels(work / drawn), _pixels(ROOT / "docs" / "images" / pictured)
        assert got.shape == shown.shape, drawn
        # The same maps up to the last bits of floating point on another machine.
        assert np.abs(got - shown).mean() < 1.0, drawn


def test_the_audit_and_bench_examples_wrote_their_files(ran: dict[str, Any]) -> None:
    import json

    work: Path = ran["work"]
    figures = json.loads((work / "audit" / "audit.json").read_text())
    assert figures["images"] == 16  # the README's --count
    assert set(figures["models"]) == {"shapes", "shapes-spurious"}
    assert (work / "audit" / "audit.html").stat().st_size > 0
    with Image.open(work / "audit" / "energy.png") as png:
        assert png.format == "PNG"
    with Image.open(work / "bench" / "oip.png") as png:
        assert png.size == (1000, 400)
    audit = next(done for block, _, done in ran["results"] if "salience audit" in block)
    assert "median energy on object" in audit.stderr
    review = (work / "review" / "report.html").read_text(encoding="utf-8")
    assert "road_008" in review
