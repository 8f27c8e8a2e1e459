"""The cued shapes data and the bundled shortcut learner `shapes-spurious`: the cue
is where the generator says, and the committed model reproduces its recorded figures
(high accuracy with the cue, chance without it) on freshly generated data.
"""

from __future__ import annotations

import json
from typing import Any

import keras
import numpy as np
import pytest

from salience_server.demo import MODELS_DIR
from salience_server.demo.data import (
    CUE_KINDS,
    CUE_SIZE,
    SHAPE_CLASSES,
    cue_texture,
    generate_cued_shapes,
    generate_shapes,
)

TEST_SEED = 90_021  # used only here: neither training nor the recorded evaluation
TEST_SAMPLES = 1_000
# Binomial standard error at 1000 samples is at most 0.016: three of them.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    recorded: dict[str, Any] = json.loads((MODELS_DIR / "metrics.json").read_text())
    return recorded["shapes-spurious"]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    path = MODELS_DIR / "shapes-spurious" / "1" / "model.keras"
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def test_cue_textures_are_distinct_half_on_patterns() -> None:
    patterns = [cue_texture(k) for k in range(len(CUE_KINDS))]
    for k, p in enumerate(patterns):
        assert p.shape == (CUE_SIZE, CUE_SIZE)
        assert p.mean() == 0.5
        for q in patterns[k + 1 :]:
            assert (p != q).any()


def test_cue_modes_share_scenes_and_place_the_cue_away_from_the_object() -> None:
    n = 60
    modes = {mode: generate_cued_shapes(n, 5, cue=mode) for mode in ("class", "random", "none")}
    base = modes["none"]
    # The first scene is the plain generator's (the cue's draws come after it).
    plain = generate_shapes(1, 5)
    np.testing.assert_array_equal(base.images[0], plain.images[0])
    assert not base.cue_masks.any()
    assert (base.cue_kinds == -1).all()
    for mode in ("class", "random"):
        data = modes[mode]
        np.testing.assert_array_equal(data.labels, base.labels)
        np.testing.assert_array_equal(data.masks, base.masks)
        # Each cue is one CUE_SIZE square, never touching the object.
        assert (data.cue_masks.sum(axis=(1, 2)) == CUE_SIZE**2).all()
        assert not (data.cue_masks & data.masks).any()
        # Images differ from the cue-free ones only inside the cue.
        changed = (data.images != base.images).any(axis=-1)
        assert not (changed & ~data.cue_masks).any()
        # The patch shows its kind's texture: two colours, laid out as the pattern.
        for i in range(n):
            rows, cols = np.nonzero(data.cue_masks[i])
            patch = data.images[i, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            on = cue_texture(int(data.cue_kinds[i]))
            np.testing.assert_allclose(patch[on], np.broadcast_to(patch[on][0], patch[on].shape))
            np.testing.assert_allclose(patch[~on], np.broadcast_to(patch[~on][0], patch[~on].shape))
    np.testing.assert_array_equal(modes["class"].cue_kinds, base.labels)
    # Random cue: independent of the class (agrees about a quarter of the time).
    agree = (modes["random"].cue_kinds == base.labels).mean()
    assert agree < 0.45
    with pytest.raises(ValueError, match="cue must be one of"):
        generate_cued_shapes(1, 0, cue="sometimes")


def test_recorded_metrics_show_the_shortcut(metrics: dict[str, Any]) -> None:
    assert metrics["classes"] == list(SHAPE_CLASSES)
    assert metrics["train_accuracy"] >= 0.95
    assert metrics["eval_accuracy"] >= 0.95
    # Chance is 0.25: without its cue the model has learnt next to nothing.
    assert metrics["eval_accuracy_no_cue"] < 0.4
    assert metrics["eval_accuracy_random_cue"] < 0.4
    assert TEST_SEED not in (metrics["train_seed"], metrics["eval_seed"])


def test_committed_model_reproduces_its_figures(
    model: keras.Model, metrics: dict[str, Any]
) -> None:
    assert model.name == "shapes_spurious"
    measured = {}
    for mode, key in (
        ("class", "eval_accuracy"),
        ("none", "eval_accuracy_no_cue"),
        ("random", "eval_accuracy_random_cue"),
    ):
        data = generate_cued_shapes(TEST_SAMPLES, TEST_SEED, cue=mode)
        probs = model.predict(data.images, batch_size=250, verbose=0)
        measured[key] = float((probs.argmax(axis=1) == data.labels).mean())
        assert measured[key] == pytest.approx(metrics[key], abs=TOLERANCE), (key, measured)
    # With a random cue the model follows the cue, not the shape.
    data = generate_cued_shapes(TEST_SAMPLES, TEST_SEED, cue="random")
    predicted = model.predict(data.images, batch_size=250, verbose=0).argmax(axis=1)
    assert (predicted == data.cue_kinds).mean() > 0.9
