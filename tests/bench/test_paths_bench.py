"""Per-request cost of Blur IG, Guided IG and XRAI through the service next to PAIR's
saliency library, on MobileNetV2 (random weights) at 224×224.

Run with `make bench` (`pytest -m bench -s tests/bench`); the normal test command
deselects it. Both sides explain the same logit of the same model on the same image
with the same parameters:

- service: one `Explain` request of one image over gRPC to a real server (plan,
  batched device calls, finish, the wire);
- PAIR: `saliency.core.BlurIG / GuidedIG / XRAI.GetMask` with the call-model
  function a user would write: a `tf.function` of one `GradientTape` over the batch
  PAIR hands it (its `batch_size` set to the step count, so PAIR batches every path
  point it can; Guided IG's path is sequential in both).

Each case is warmed up, then timed REPEATS times with the two sides alternating;
medians are compared, so that load from other processes hits both alike. The test
prints the figures and asserts no timing: only that both computed the same map.
"""

from __future__ import annotations

import os
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import running_server

pytestmark = pytest.mark.bench

UNIT = 7
REPEATS = int(os.environ.get("SALIENCE_BENCH_REPEATS", "2"))
# (method, service options, PAIR call): modest step counts so one run stays short.
STEPS = {"blur-ig": 32, "guided-ig": 16, "xrai": 16}


def logit_gradients(model: Any) -> Callable[..., dict[str, np.ndarray]]:
    """PAIR's call-model function: ∂logit/∂x of the `predictions` layer's pre-softmax
    (what the service explains by default on a softmax head), for a whole batch."""
    import keras
    import saliency.core as pair
    import tensorflow as tf

    head = model.get_layer("predictions")
    features = keras.Model(model.inputs, head.input)
    kernel, bias = (tf.constant(w) for w in head.get_weights())

    @tf.function(reduce_retracing=True)
    def gradients(rows: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(rows)
            logits = tf.matmul(features(rows, training=False), kernel) + bias
            score = tf.reduce_sum(logits[:, UNIT])
        return tape.gradient(score, rows)

    def call(batch: Any, call_model_args: Any = None, expected_keys: Any = None) -> Any:
        rows = tf.convert_to_tensor(np.asarray(batch, np.float32))
        return {pair.base.INPUT_OUTPUT_GRADIENTS: gradients(rows).numpy()}

    return call


def guided_ig_module() -> Any:
    """PAIR's guided_ig with its `np.quantile(interpolation=)` call (renamed `method`
    in numpy 2) translated; see tests/integration/test_methods_paths.py."""
    import saliency.core.guided_ig as guided_ig

    def quantile(a: Any, q: Any, interpolation: str = "linear", **kwargs: Any) -> Any:
        return np.quantile(a, q, method=interpolation, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = quantile
    guided_ig.np = shim
    return guided_ig


def pair_call(method: str, image: np.ndarray, call: Any) -> Callable[[], np.ndarray]:
    import saliency.core as pair

    steps = STEPS[method]
    if method == "blur-ig":
        return lambda: pair.BlurIG().GetMask(
            image, call, max_sigma=50, steps=steps, grad_step=0.01, batch_size=steps
        )
    if method == "guided-ig":
        guided = guided_ig_module().GuidedIG()
        return lambda: guided.GetMask(image, call, x_steps=steps, fraction=0.25, max_dist=0.02)
    parameters = pair.XRAIParameters(steps=steps)
    return lambda: pair.XRAI().GetMask(
        image, call, batch_size=2 * steps, extra_parameters=parameters
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@pytest.mark.parametrize("method", ["blur-ig", "guided-ig", "xrai"])
def test_path_methods_against_pair(method: str, repo: Path) -> None:
    import keras

    model = keras.saving.load_model(repo / "mobilenet" / "1" / "model.keras", compile=False)
    image = np.random.default_rng(0).uniform(-1, 1, (224, 224, 3)).astype(np.float32)
    reference = pair_call(method, image, logit_gradients(model))
    options: dict[str, Any] = {
        "method": method,
        "filter_indices": [UNIT],
        "steps": STEPS[method],
        "grad_modifiers": ["none"],
        "normalize": False,
    }
    if method != "xrai":
        options["keepdims"] = True
    with running_server(repo) as served, served.client(timeout=600) as client:

        def service() -> np.ndarray:
            return client.explain("mobilenet", image[None], **options).maps["none"][0]

        service()  # warm-up: traces and compiles
        reference()
        ours, theirs = [], []
        for _ in range(REPEATS):
            seconds, got = timed(service)
            ours.append(seconds)
            seconds, want = timed(reference)
            theirs.append(seconds)
    # The random-weight network's logit gradients are ~1e-16: maps agree to float32
    # rounding of those (the exact parity is checked in test_methods_paths on models
    # with gradients of size 1). Guided IG's selections and XRAI's region ranking
    # amplify rounding differences, so agreement is measured as a correlation.
    assert float(np.abs(want).max()) > 0
    agreement = float(np.corrcoef(np.ravel(got), np.ravel(want))[0, 1])
    service_s, pair_s = statistics.median(ours), statistics.median(theirs)
    print(
        f"\n{method:>9} steps={STEPS[method]:<3} MobileNetV2 224x224, one image per request: "
        f"service {service_s:7.3f} s   PAIR saliency {pair_s:7.3f} s   "
        f"PAIR/service {pair_s / service_s:5.2f}x   (median of {REPEATS}; "
        f"map correlation {agreement:.4f})"
    )
    assert agreement > 0.9


def test_guided_ig_batch_against_pair(repo: Path) -> None:
    # Guided IG's path is sequential, so one image gains nothing from batching; several
    # images of one request walk their paths together, one device call per step for
    # all of them, where PAIR explains them one after another.
    import keras

    batch = 4
    model = keras.saving.load_model(repo / "mobilenet" / "1" / "model.keras", compile=False)
    images = np.random.default_rng(1).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
    call = logit_gradients(model)
    references = [pair_call("guided-ig", image, call) for image in images]
    options: dict[str, Any] = {
        "method": "guided-ig",
        "filter_indices": [UNIT],
        "steps": STEPS["guided-ig"],
        "grad_modifiers": ["none"],
        "normalize": False,
        "keepdims": True,
    }
    with running_server(repo) as served, served.client(timeout=600) as client:

        def service() -> np.ndarray:
            return client.explain("mobilenet", images, **options).maps["none"]

        def reference() -> np.ndarray:
            return np.stack([r() for r in references])

        service()
        reference()
        ours, theirs = [], []
        for _ in range(REPEATS):
            seconds, got = timed(service)
            ours.append(seconds)
            seconds, want = timed(reference)
            theirs.append(seconds)
    agreement = float(np.corrcoef(np.ravel(got), np.ravel(want))[0, 1])
    service_s, pair_s = statistics.median(ours), statistics.median(theirs)
    print(
        f"\nguided-ig steps={STEPS['guided-ig']:<3} MobileNetV2 224x224, {batch} images per "
        f"request: service {service_s:7.3f} s   PAIR saliency {pair_s:7.3f} s   "
        f"PAIR/service {pair_s / service_s:5.2f}x   (median of {REPEATS}; "
        f"map correlation {agreement:.4f})"
    )
    assert agreement > 0.9
