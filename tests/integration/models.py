"""Tiny Keras models with known gradients, saved into a test repository, and an
independent numpy implementation of the reference semantics to check maps against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EPS = 1e-7
LINEAR_SHAPE = (6, 5, 3)
SMOOTH_SHAPE = (7, 6, 2)


def build_repository(root: Path) -> Path:
    """`linear` (Dense logits), `softmax` (Dense softmax head) and `smooth` (a float64
    conv net with smooth activations, for finite differences)."""
    import keras

    from tests.conftest import save_model

    keras.utils.set_random_seed(7)
    x = keras.Input(LINEAR_SHAPE, name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    save_model(root, "linear", keras.Model(x, keras.layers.Dense(4, name="logits")(flat)))

    x = keras.Input(LINEAR_SHAPE, name="x")
    flat = keras.layers.Flatten(name="flatten")(x)
    probs = keras.layers.Dense(4, activation="softmax", name="probs")(flat)
    save_model(root, "softmax", keras.Model(x, probs))

    kw: dict[str, Any] = {"dtype": "float64"}
    x = keras.Input(SMOOTH_SHAPE, name="x", dtype="float64")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv", **kw)(x)
    h = keras.layers.Conv2D(3, 3, strides=2, activation="softplus", name="conv2", **kw)(h)
    h = keras.layers.Flatten(name="flatten", **kw)(h)
    h = keras.layers.Dense(5, activation="tanh", name="hidden", **kw)(h)
    out = keras.layers.Dense(3, activation="sigmoid", name="out", **kw)(h)
    save_model(root, "smooth", keras.Model(x, out))
    return root


def modify(g: np.ndarray, modifier: str) -> np.ndarray:
    """The grad_modifier table of the reference semantics."""
    g = g.astype(np.float64)
    return {
        "absolute": lambda: np.abs(g),
        "none": lambda: g,
        "negate": lambda: -g,
        "relu": lambda: np.maximum(g, 0),
        "invert": lambda: 1 / (g + EPS),
        "small_values": lambda: np.abs(1 / (g + EPS)),
    }[modifier]()


def reference_map(grads: np.ndarray, modifier: str, keepdims: bool, normalize: bool) -> np.ndarray:
    """Reference map of a batch of raw gradients (batch first)."""
    s = modify(grads, modifier)
    if not keepdims and s.ndim >= 3:
        s = s.max(axis=-1)
    if normalize:
        axes = tuple(range(1, s.ndim))
        low = s.min(axis=axes, keepdims=True)
        high = s.max(axis=axes, keepdims=True)
        s = (s - low) / (high - low + EPS)
    return s
