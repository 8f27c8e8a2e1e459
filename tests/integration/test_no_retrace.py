"""Steady-state requests never trace a TensorFlow function again, for every method.

What changes the compiled graph (the method, its targets, samples, steps, the backprop
modifier) is traced once. Everything else — batch size, filter indices, objective
weights, seeds, noise levels, baselines — is a tensor argument of the device function;
grad modifiers, keepdims, normalisation and the map dtype choose a finish function
traced once per distinct set (`modifiers.map_function`, the CAM finishes), and never
the device function — except SmoothGrad's, which takes the set of grad modifiers into
its graph (each noisy copy's gradient is modified before the mean). After one request
of each kind, any mix of the rest must trace nothing anywhere in the process: the
check sums the tracing counts of every live `tf.function`, not only the ones we know
about.
"""

from __future__ import annotations

import gc
import itertools
from typing import Any

import numpy as np
import pytest

from salience_client import Objective, SalienceClient
from salience_server.explain.methods import METHODS
from tests.conftest import save_model

SHAPE = (8, 8, 3)
CLASSES = 4

# Options that shape each method's graph: held fixed while everything else varies.
GRAPH_OPTIONS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 4},
    "integrated-gradients": {"steps": 8},
    "occlusion": {"window": 3, "stride": 2},
    "blur-ig": {"steps": 4},
    "guided-ig": {"steps": 4},
    "xrai": {"steps": 4},
}
BACKPROP_MODIFIERS = ["", "guided", "rectified"]
# Grad-CAM and Grad-CAM++ weight activations by the ordinary gradient; Guided Grad-CAM
# always uses "guided": none of them takes a backprop modifier.
# Score-CAM, Faster-ScoreCAM and occlusion take no gradient at all.
ORDINARY_GRADIENT_ONLY = {
    "gradcam",
    "gradcam++",
    "guided-gradcam",
    "layercam",
    "scorecam",
    "faster-scorecam",
    "occlusion",
}
CASES = [
    (method, modifier)
    for method in sorted(METHODS)
    for modifier in ([""] if method in ORDINARY_GRADIENT_ONLY else BACKPROP_MODIFIERS)
]
# Methods that apply the grad modifiers inside the device function (SmoothGrad modifies
# every noisy copy's gradient before the mean): each new set of modifiers is a graph.
MODIFIERS_IN_GRAPH = {"smoothgrad"}

# Per-request post-processing: each distinct set gets its finish function once.
POSTS: list[dict[str, Any]] = [
    {},
    {"grad_modifiers": ["absolute", "none", "negate"]},
    {"grad_modifiers": ["relu"], "normalize": False},
    {"grad_modifiers": ["small_values", "invert"], "keepdims": True},
    {"output_dtype": "uint8"},
    {"output_dtype": "float16", "keepdims": True},
]


def build_convnet() -> Any:
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input(SHAPE, name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(h)
    return keras.Model(x, out)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> Any:
    repo = save_model(tmp_path_factory.mktemp("retrace-repo"), "convnet", build_convnet())
    return server_factory(repo)


def live_traces() -> int:
    """How many times every tf.function alive in this process has been traced."""
    from tensorflow.python.eager.polymorphic_function.polymorphic_function import Function

    return sum(
        obj.experimental_get_tracing_count()
        for obj in gc.get_objects()
        if isinstance(obj, Function)
    )


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *SHAPE)).astype("float32")


def targets(k: int) -> dict[str, Any]:
    """Different filter indices and objective weights on the same target layers."""
    choices: list[dict[str, Any]] = [
        {"filter_indices": [0]},
        {"filter_indices": [1, 3]},
        {"objectives": [Objective(-1, [2], -2.0)]},
        {"objectives": [Objective("probs", [0, 3], 0.5)]},
        {"filter_indices": []},
    ]
    return choices[k % len(choices)]


def per_request(method: str, k: int, n: int) -> dict[str, Any]:
    """Options that are per-sample parameters of the device function."""
    if method == "smoothgrad":
        return {"seed": 100 + k, "noise": [0.05, 0.2, 0.5][k % 3]}
    if method == "integrated-gradients":
        # One baseline for the batch or one per sample: both are per-sample rows.
        one = np.full(SHAPE, 0.1 * k, np.float32)
        return {"baseline": one if k % 2 else np.stack([one] * n)}
    if method in ("scorecam", "faster-scorecam", "occlusion"):
        # Rows per forward pass (and occlusion's value) are tensor arguments too.
        chunk = {"chunk_size": [0, 5, 17][k % 3]}
        return {**chunk, "occlusion_value": 0.1 * k} if method == "occlusion" else chunk
    if method == "blur-ig":
        return {"blur_max_sigma": [2.0, 5.0, 30.0][k % 3], "blur_grad_step": [0.01, 0.1][k % 2]}
    if method == "guided-ig":
        one = np.full(SHAPE, 0.1 * k, np.float32)
        return {
            "guided_fraction": [0.25, 0.5, 1.0][k % 3],
            "guided_max_dist": [0.02, 0.0, 1.0][k % 3],
            "baseline": one if k % 2 else np.stack([one] * n),
        }
    if method == "xrai":
        # The segmentation's parameters are per-sample rows too (read on the host).
        return {
            "xrai_scales": [[50.0, 300.0], [100.0], [150.0, 250.0, 500.0]][k % 3],
            "xrai_sigma": [0.8, 0.3][k % 2],
            "xrai_min_size": [40, 150][k % 2],
            "xrai_dilation_radius": [0, 2, 5][k % 3],
            "xrai_area_threshold": [1.0, 0.5][k % 2],
        }
    return {}


def modifier_set(method: str, post: dict[str, Any]) -> frozenset[str]:
    return frozenset(post.get("grad_modifiers", [METHODS[method].default_grad_modifier]))


@pytest.mark.parametrize(("method", "backprop_modifier"), CASES)
def test_steady_state_requests_trace_nothing(
    running: Any, method: str, backprop_modifier: str
) -> None:
    runtime = running.server.core.repository.get("convnet")
    fixed = {
        "method": method,
        "backprop_modifier": backprop_modifier,
        **GRAPH_OPTIONS.get(method, {}),
    }
    with running.client() as client:
        explain(client, method, 0, 1, fixed, {})
        graphs = runtime.traces
        # One request per post-processing set: each may trace its finish function once,
        # but keepdims, normalize and output_dtype never touch the device function.
        seen = {modifier_set(method, {})}
        for post in POSTS:
            seen.add(modifier_set(method, post))
            explain(client, method, 0, 1, fixed, post)
            new_sets = len(seen) - 1 if method in MODIFIERS_IN_GRAPH else 0
            assert runtime.traces == graphs + new_sets, (method, post)

        graphs = runtime.traces
        before = live_traces()
        for k, (n, post) in enumerate(itertools.product([1, 3, 5], POSTS)):
            explain(client, method, k + 1, n, fixed, post)
        assert runtime.traces == graphs
        assert live_traces() == before, f"{method} {backprop_modifier!r}: a function retraced"


def explain(
    client: SalienceClient,
    method: str,
    k: int,
    n: int,
    fixed: dict[str, Any],
    post: dict[str, Any],
) -> Any:
    return client.explain(
        "convnet",
        images(n, k),
        **targets(k),
        **per_request(method, k, n),
        **fixed,
        **post,
    )


@pytest.mark.parametrize(
    ("method", "option", "values"),
    [
        ("smoothgrad", "samples", [1, 2, 3, 5, 8, 13, 21]),
        ("integrated-gradients", "steps", [1, 2, 3, 5, 8, 13, 21]),
        ("occlusion", "window", [1, 2, 3, 5, 8]),
        ("faster-scorecam", "top_channels", [1, 2, 3, 4]),
        ("blur-ig", "steps", [1, 2, 3, 5, 8]),
        ("guided-ig", "steps", [1, 2, 3, 5, 8]),
        ("xrai", "steps", [2, 3, 5, 8]),
    ],
)
def test_every_count_of_samples_or_steps_reuses_one_graph(
    running: Any, method: str, option: str, values: list[int]
) -> None:
    # Counts are tensor arguments: a new count traces nothing (each used to trace a
    # graph of its own: 0.3 s and more memory per count), and each still computes
    # its own count (the echo, and maps that differ from count to count).
    runtime = running.server.core.repository.get("convnet")
    x = images(2, 7)
    with running.client() as client:
        raw = {"seed": 1, "normalize": False, "grad_modifiers": ["absolute"]}
        first = client.explain("convnet", x, method=method, **raw, **{option: values[0]})
        graphs, before = runtime.traces, live_traces()
        maps = [first.maps]
        for value in values[1:]:
            result = client.explain("convnet", x, method=method, **raw, **{option: value})
            assert getattr(result.resolved, option) == value
            maps.append(result.maps)
    assert runtime.traces == graphs, f"{method}: a new {option} count traced a graph"
    assert live_traces() == before, f"{method}: a new {option} count retraced a function"
    # (Their agreement with each method's definition at a given count is checked in
    # test_methods_noise_ig; here, that no two counts gave the same raw map.)
    for a, b in itertools.pairwise(maps):
        assert not np.array_equal(a["absolute"], b["absolute"])
