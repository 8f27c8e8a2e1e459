"""`salience audit` against a real server on the bundled demo models: the audit tells
the shape classifier from the shortcut learner without being told which is which,
its figures agree with maps fetched independently, and its report renders.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from salience_client import audit_metrics as am
from salience_server.demo.data import generate_cued_shapes
from tests.conftest import RunningServer

ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]
COUNT = 24
SEED = 7
METHODS = ("vanilla", "gradcam", "guided-backprop")


@pytest.fixture(scope="module")
def served(demo_server: RunningServer) -> RunningServer:
    return demo_server  # the bundled demo models


@pytest.fixture(scope="module")
def audited(served: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("audit")
    args = [
        "audit",
        "--target",
        served.target,
        "--model",
        "shapes,shapes-spurious",
        "--data",
        "generated",
        "--count",
        str(COUNT),
        "--seed",
        str(SEED),
        "--methods",
        ",".join(METHODS),
        "--steps",
        "8",
        "--randomize-images",
        "8",
        "--json",
        str(out / "audit.json"),
        "--report",
        str(out / "audit.html"),
        "--plot",
        str(out / "energy.png"),
    ]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return {"json": json.loads((out / "audit.json").read_text()), "dir": out}


def test_audit_separates_the_models(audited: dict[str, Any]) -> None:
    models = audited["json"]["models"]
    shapes, spurious = models["shapes"], models["shapes-spurious"]
    area = audited["json"]["object_area"]["mean"]
    cue_area = audited["json"]["cue_area"]["mean"]
    for name in METHODS:
        s, p = shapes["methods"][name], spurious["methods"][name]
        # `shapes` concentrates its maps on the object (measured: about twice its
        # area share for the gradient maps, three times for Grad-CAM; not over half of
        # the energy, the gradients spill over the object's edges and the clutter), and
        # far more than on the cue.
        assert s["energy_object"]["mean"] > 1.5 * area, name
        assert s["energy_object"]["mean"] > 5 * s["energy_cue"]["mean"], name
        # The shortcut learner looks at the cue: more energy there than on the object,
        # on a patch a third the object's size.
        assert p["energy_cue"]["mean"] > p["energy_object"]["mean"], name
        assert p["energy_cue"]["mean"] > 5 * cue_area, name
        assert p["pointing_cue"] > 0.5 > p["pointing_object"], name
    # Insertion beats a random ordering for vanilla and Grad-CAM on `shapes`.
    for name in ("vanilla", "gradcam"):
        insertion = shapes["methods"][name]["insertion"]
        assert insertion["area"]["mean"] > insertion["random_area"]["mean"], name
    # The data set's cue is random: the shortcut learner is near chance, `shapes` is not.
    assert shapes["accuracy"] > 0.7
    assert spurious["accuracy"] < 0.5


def test_randomisation_cascade(audited: dict[str, Any]) -> None:
    shapes = audited["json"]["models"]["shapes"]["methods"]
    layers = [c["layer"] for c in shapes["vanilla"]["randomization"]]
    assert layers == ["predictions", "fc1", "conv4", "conv3", "conv2", "conv1"]
    for name in ("vanilla", "gradcam"):
        rho = [c["spearman"]["mean"] for c in shapes[name]["randomization"]]
        # Markedly changed once every layer is re-initialised.
        assert rho[-1] < 0.5, (name, rho)
    guided = [c["spearman"]["mean"] for c in shapes["guided-backprop"]["randomization"]]
    # Measured, not tuned: guided backprop barely changes while only the dense top is
    # re-initialised (Adebayo et al.'s finding) and more than vanilla does there.
    vanilla = [c["spearman"]["mean"] for c in shapes["vanilla"]["randomization"]]
    assert guided[0] > 0.85
    assert guided[1] > vanilla[1]


def test_figures_match_independent_maps(audited: dict[str, Any], served: RunningServer) -> None:
    # The generated set is generate_cued_shapes(COUNT, SEED, "random"); recompute the
    # vanilla energy shares of a few images from maps fetched one request per image.
    data = generate_cued_shapes(COUNT, SEED, cue="random")
    figures = audited["json"]["models"]["shapes"]["methods"]["vanilla"]
    with served.client() as client:
        for i in range(4):
            image = data.images[i : i + 1]
            label = int(client.predict("shapes", image).outputs["predictions"].argmax())
            saliency = client.explain("shapes", image, filter_indices=[label]).maps["absolute"]
            expected = am.energy_share(saliency, data.masks[i : i + 1])[0]
            assert figures["energy_object_per_image"][i] == pytest.approx(expected, abs=1e-4)
    shares = np.asarray(figures["energy_object_per_image"])
    assert figures["energy_object"]["median"] == pytest.approx(float(np.median(shares)), abs=1e-4)
    # Curves start from the untouched image (deletion) and the full baseline (insertion).
    curve = figures["deletion"]["curve"]
    assert len(curve) == 9
    assert curve[0] > curve[-1]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def test_report_renders_with_embedded_images(audited: dict[str, Any]) -> None:
    text = (audited["dir"] / "audit.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(text)
    parser.close()
    assert {"html", "table", "script"} <= set(parser.tags)
    # Energy plot, then per model: curves, randomisation, one worst-images strip per method.
    assert len(parser.sources) == 1 + 2 * (2 + len(METHODS))
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert min(image.size) > 100
    with Image.open(audited["dir"] / "energy.png") as plot:
        assert plot.format == "PNG"
        assert plot.size[0] > 300


@pytest.mark.parametrize(
    "methods",
    [
        ["scorecam", "faster-scorecam", "layercam", "occlusion"],
        ["blur-ig", "guided-ig", "xrai"],
    ],
    ids=["forward", "paths"],
)
def test_audit_takes_the_newer_methods(
    served: RunningServer, tmp_path: Path, methods: list[str]
) -> None:
    """Score-CAM, Faster-ScoreCAM, Layer-CAM, occlusion, Blur IG, Guided IG and XRAI are
    audit methods too: on `shapes` each map's insertion curve beats a random order."""
    args = [
        "audit", "--target", served.target, "--model", "shapes", "--data", "generated",
        "--count", "8", "--seed", str(SEED), "--methods", ",".join(methods), "--steps", "4",
        "--randomize-images", "2", "--json", str(tmp_path / "audit.json"),
    ]  # fmt: skip
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.returncode}\n{done.stdout}\n{done.stderr}"
    figures = json.loads((tmp_path / "audit.json").read_text())["models"]["shapes"]
    for name in methods:
        insertion = figures["methods"][name]["insertion"]
        assert insertion["area"]["mean"] > insertion["random_area"]["mean"], name
