"""What the bad-input table and the fuzz test share: their model repository, raw
calls that bypass the stubs' serialisers, and the closed-form answers of `linear`
that every valid request sent between bad ones is checked against.

`linear` is `logits = flat(x) @ W + b`, so its prediction is one matrix product
and the raw vanilla gradient of logit `j` is `W[:, j]` for every sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from tests.integration.models import LINEAR_SHAPE, build_repository

SERVICE = "/salience.v1.Salience/"
PAIR_SHAPES = {"a": (3,), "b": (2,)}


def build_bad_input_repository(root: Path) -> Path:
    """The models of `build_repository`, plus `pair` (inputs `a` and `b`) and
    `valid` (free spatial axes, then a 3×3 convolution without padding, so inputs
    smaller than 3×3 pass the input checks but not the model's layers).
    """
    import keras

    from tests.conftest import save_model

    build_repository(root)
    a = keras.Input(PAIR_SHAPES["a"], name="a")
    b = keras.Input(PAIR_SHAPES["b"], name="b")
    joined = keras.layers.Concatenate(name="joined")([a, b])
    save_model(root, "pair", keras.Model([a, b], keras.layers.Dense(2, name="out")(joined)))
    image = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(2, 3, name="conv")(image)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(root, "valid", keras.Model(image, keras.layers.Dense(2, name="logits")(h)))
    return root


@dataclass(frozen=True)
class Linear:
    """The weights of the repository's `linear` model, in float64."""

    kernel: np.ndarray  # (90, 4)
    bias: np.ndarray  # (4,)

    @classmethod
    def load(cls, repo: Path) -> Linear:
        import keras

        model = keras.saving.load_model(repo / "linear" / "1" / "model.keras", compile=False)
        kernel, bias = model.get_layer("logits").get_weights()
        return cls(kernel.astype(np.float64), bias.astype(np.float64))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float64) @ self.kernel + self.bias

    def gradient(self, unit: int) -> np.ndarray:
        """∂ logit[unit] / ∂ x for one sample: the kernel's column."""
        return self.kernel[:, unit].reshape(LINEAR_SHAPE)


def wire_dtype(value: int) -> pb.DataType:
    """Any int32 as a DataType: proto3 enums are open, so unknown values travel too."""
    return cast(pb.DataType, value)


def good_x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def predict_request(x: np.ndarray, model: str = "linear") -> pb.PredictRequest:
    return pb.PredictRequest(model=pb.ModelSpec(name=model), inputs=[tensors.encode(x)])


def check_still_serving(channel: grpc.Channel, linear: Linear, seed: int = 0) -> None:
    """A valid Predict and a valid Explain of `linear` get exactly their closed forms."""
    from salience.v1 import salience_pb2_grpc

    stub = salience_pb2_grpc.SalienceStub(channel)
    x = good_x(2, seed)
    predicted = stub.Predict(predict_request(x), timeout=30)
    outputs = tensors.decode(predicted.outputs[0], "outputs[0]")
    np.testing.assert_allclose(outputs, linear.logits(x), rtol=1e-5, atol=1e-5)
    unit = seed % 4
    request = pb.ExplainRequest(
        model=pb.ModelSpec(name="linear"),
        inputs=[tensors.encode(x)],
        explanation=pb.Explanation(
            objectives=[pb.Objective(filter_indices=[unit])],
            grad_modifiers=["none"],
            keepdims=True,
            normalize=False,
        ),
    )
    explained = stub.Explain(request, timeout=30)
    saliency = tensors.decode(explained.maps[0].map, "maps[0]")
    for sample in saliency:
        np.testing.assert_allclose(sample, linear.gradient(unit), rtol=1e-5, atol=1e-6)


def call_raw(channel: grpc.Channel, rpc: str, data: bytes, timeout: float = 30) -> bytes:
    """Sends bytes as they are (no serialiser) to `rpc`; returns the response's bytes."""
    method = channel.unary_unary(SERVICE + rpc, request_serializer=None)
    response: Any = method(data, timeout=timeout)
    return bytes(response)
