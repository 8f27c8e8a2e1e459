"""The demo clip generator works where PyAV is not installed (as after `make serve`):
it writes the frames, and says how to install PyAV for the video."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.e2e.review_clip import CLIP_FRAMES, driving_clip, to_uint8

ROOT = Path(__file__).resolve().parents[2]
# A fresh interpreter in which `import av` fails, as it does without the extra.
WITHOUT_PYAV = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "av":
            raise ImportError("No module named 'av'")
sys.meta_path.insert(0, Refuse())
sys.argv = ["review_clip", *sys.argv[1:]]
runpy.run_module("tests.e2e.review_clip", run_name="__main__")
"""


def test_without_pyav_the_frames_are_written_and_the_message_says_how_to_install_it(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYAV, str(tmp_path / "clip")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{tmp_path / 'clip' / 'clip.mp4'} not written: " in done.stderr
    assert "pip install 'salience[review]'" in done.stderr
    assert not (tmp_path / "clip" / "clip.mp4").exists()
    frames = sorted((tmp_path / "clip" / "frames").glob("road_*.png"))
    assert len(frames) == CLIP_FRAMES
    expected = to_uint8(driving_clip()[0])
    for k in (0, 8, CLIP_FRAMES - 1):
        with Image.open(frames[k]) as png:
            np.testing.assert_array_equal(np.asarray(png), expected[k])
