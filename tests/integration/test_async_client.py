"""The asyncio client against a real server: the same typed results as the blocking
client, value for value (and against the closed forms of a linear model), many
calls in flight on one channel, deadlines and errors surfaced the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience_client import (
    AsyncSalienceClient,
    Explanation,
    Prediction,
    ResolvedExplanation,
    ResolvedObjective,
    SalienceError,
)
from tests.conftest import RunningServer, running_server, save_model

FEATURES = 6
UNITS = 3
EPS = 1e-7


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`linear`: logits = x @ W + b on 6 features, 3 units (whose gradients are W)."""
    import keras

    keras.utils.set_random_seed(13)
    x = keras.Input((FEATURES,), name="x")
    logits = keras.layers.Dense(UNITS, name="logits", bias_initializer="glorot_uniform")(x)
    return save_model(tmp_path_factory.mktemp("async-repo"), "linear", keras.Model(x, logits))


@pytest.fixture(scope="module")
def weights(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    import keras

    model = keras.saving.load_model(repo / "linear" / "1" / "model.keras")
    kernel, bias = model.get_layer("logits").get_weights()
    return kernel.astype(np.float64), bias.astype(np.float64)


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo) as running:
        yield running


def x_batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, FEATURES)).astype(np.float32)


def normalized(values: np.ndarray) -> np.ndarray:
    low = values.min(axis=-1, keepdims=True)
    high = values.max(axis=-1, keepdims=True)
    return (values - low) / (high - low + EPS)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_same_prediction(a: Prediction, b: Prediction) -> None:
    assert a.model_version == b.model_version
    assert a.labels == b.labels
    assert a.outputs.keys() == b.outputs.keys()
    for name in a.outputs:
        np.testing.assert_array_equal(a.outputs[name], b.outputs[name])


def assert_same_explanation(a: Explanation, b: Explanation) -> None:
    assert a.model_version == b.model_version
    assert a.resolved == b.resolved
    assert a.maps.keys() == b.maps.keys()
    for name in a.maps:
        np.testing.assert_array_equal(a.maps[name], b.maps[name])
    for name in a.outputs:
        np.testing.assert_array_equal(a.outputs[name], b.outputs[name])
    for left, right in (
        (a.completeness_residual, b.completeness_residual),
        (a.score_difference, b.score_difference),
    ):
        assert (left is None) == (right is None)
        if left is not None:
            np.testing.assert_array_equal(left, right)


def test_async_predictions_equal_the_blocking_clients_and_the_closed_form(
    served: RunningServer, weights: tuple[np.ndarray, np.ndarray]
) -> None:
    kernel, bias = weights
    x = x_batch(4, seed=1)

    async def call() -> Prediction:
        async with AsyncSalienceClient(served.target) as client:
            return await client.predict("linear", x)

    got = run(call())
    with served.client() as client:
        want = client.predict("linear", x)
    assert_same_prediction(got, want)
    assert got.model_version == 1
    np.testing.assert_allclose(got.predictions, x @ kernel + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"filter_indices": [1], "grad_modifiers": ["absolute", "none", "negate"]},
        {"filter_indices": [0, 2], "normalize": False, "grad_modifiers": ["none"]},
        {"method": "smoothgrad", "filter_indices": [2], "samples": 4, "seed": 7},
        {"method": "integrated-gradients", "filter_indices": [0], "steps": 8},
    ],
)
def test_async_explanations_equal_the_blocking_clients(
    served: RunningServer, options: dict[str, Any]
) -> None:
    x = x_batch(3, seed=2)

    async def call() -> Explanation:
        async with AsyncSalienceClient(served.target) as client:
            return await client.explain("linear", x, **options)

    got = run(call())
    with served.client() as client:
        want = client.explain("linear", x, **options)
    assert_same_explanation(got, want)


def test_vanilla_maps_and_the_resolved_options_are_typed_values(
    served: RunningServer, weights: tuple[np.ndarray, np.ndarray]
) -> None:
    kernel, bias = weights
    x = x_batch(2, seed=3)

    async def call() -> Explanation:
        async with AsyncSalienceClient(served.target) as client:
            return await client.explain(
                "linear", x, filter_indices=[0, 2], grad_modifiers=["none", "absolute"], seed=5
            )

    result = run(call())
    # s = logits[0] + logits[2], so dS/dx = W[:, 0] + W[:, 2] for every sample.
    gradient = np.broadcast_to(kernel[:, 0] + kernel[:, 2], x.shape)
    np.testing.assert_allclose(result.maps["none"], normalized(gradient), atol=1e-5)
    np.testing.assert_allclose(result.maps["absolute"], normalized(np.abs(gradient)), atol=1e-5)
    np.testing.assert_allclose(result.predictions, x @ kernel + bias, rtol=1e-5, atol=1e-6)
    assert result.resolved == ResolvedExplanation(
        method="vanilla",
        objectives=(
            ResolvedObjective(
                layer_name="logits",
                layer_index=1,
                filter_indices=(0, 2),
                weight=1.0,
                used_logits=False,
                reduction="units",
            ),
        ),
        grad_modifiers=("none", "absolute"),
        normalize=True,
        output_dtype="float32",
        input="x",
        channels_reduced=False,
        seed=5,
        output="logits",
    )


def test_integrated_gradients_completeness_arrives_as_arrays(
    served: RunningServer, weights: tuple[np.ndarray, np.ndarray]
) -> None:
    kernel, _ = weights
    x = x_batch(3, seed=4)

    async def call() -> Explanation:
        async with AsyncSalienceClient(served.target) as client:
            return await client.explain(
                "linear", x, method="integrated-gradients", filter_indices=[1], steps=4
            )

    result = run(call())
    assert result.resolved.steps == 4
    # Linear: s(x) - s(0) = x @ W[:, 1], and the trapezoid rule is exact.
    assert result.score_difference is not None
    assert result.completeness_residual is not None
    np.testing.assert_allclose(result.score_difference, x @ kernel[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.completeness_residual, np.zeros(3), atol=1e-5)


def test_many_calls_in_flight_on_one_channel_each_get_their_own_rows(
    served: RunningServer, weights: tuple[np.ndarray, np.ndarray]
) -> None:
    kernel, bias = weights
    batches = [x_batch(1 + k % 3, seed=10 + k) for k in range(12)]

    async def calls() -> list[Prediction]:
        async with AsyncSalienceClient(served.target) as client:
            return await asyncio.gather(*(client.predict("linear", x) for x in batches))

    for x, prediction in zip(batches, run(calls()), strict=True):
        np.testing.assert_allclose(prediction.predictions, x @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_metadata_and_list_models_match_the_blocking_client(served: RunningServer) -> None:
    async def call() -> tuple[Any, Any]:
        async with AsyncSalienceClient(served.target) as client:
            return await client.metadata("linear"), await client.list_models()

    metadata, models = run(call())
    with served.client() as client:
        assert metadata == client.metadata("linear")
        assert models == client.list_models()
    assert [m.name for m in models] == ["linear"]
    assert [(s.name, list(s.shape)) for s in metadata.inputs] == [("x", [-1, FEATURES])]


def test_errors_carry_the_same_code_and_message(served: RunningServer) -> None:
    async def call() -> SalienceError:
        async with AsyncSalienceClient(served.target) as client:
            with pytest.raises(SalienceError) as caught:
                await client.predict("missing", x_batch(1, seed=0))
            return caught.value

    got = run(call())
    with served.client() as client, pytest.raises(SalienceError) as caught:
        client.predict("missing", x_batch(1, seed=0))
    assert got.code == caught.value.code == grpc.StatusCode.NOT_FOUND
    assert got.details == caught.value.details
    assert "'missing'" in got.details


def test_a_tiny_deadline_is_deadline_exceeded_naming_it(served: RunningServer) -> None:
    async def call() -> SalienceError:
        async with AsyncSalienceClient(served.target) as client:
            with pytest.raises(SalienceError) as caught:
                await client.explain("linear", x_batch(2, seed=0), timeout=1e-4)
            return caught.value

    err = run(call())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.timeout == 1e-4
    assert err.details.startswith("no answer within the call's deadline of 0.0001 s")


def test_deadlines_default_explicit_and_none_reach_the_server(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from salience_server import servicer

    remaining: list[float | None] = []
    original = servicer.deadline

    def deadline(context: Any) -> float | None:
        remaining.append(context.time_remaining())
        return original(context)

    monkeypatch.setattr(servicer, "deadline", deadline)
    x = x_batch(1, seed=0)

    async def calls() -> None:
        async with AsyncSalienceClient(served.target, timeout=20.0) as client:
            await client.predict("linear", x)
            await client.predict("linear", x, timeout=3.0)
            await client.predict("linear", x, timeout=None)
        async with AsyncSalienceClient(served.target, timeout=None) as client:
            await client.predict("linear", x)

    run(calls())
    default, explicit, none, unset = remaining
    # gRPC rounds a timeout up to its wire units, so a little more may arrive.
    assert default is not None
    assert 15.0 < default <= 21.0
    assert explicit is not None
    assert 0.0 < explicit <= 3.1
    assert none is None
    assert unset is None
