"""The `saliency` output beside `saliency/<m>` outputs is the map Explain gives when
no grad modifier is named: the model's configured default, else the method's. The
model decides it (`ModelDevice.default_grad_modifier`); these tests hold the answer
to Explain's on a real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from inference.v2 import grpc_service_pb2 as oip
from inference.v2 import grpc_service_pb2_grpc
from salience_client import SalienceClient
from tests.conftest import RunningServer

IMAGE = (8, 8, 3)
FILTER = 2  # a unit whose CAM maps of these images are not all zero


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from tests.conftest import save_model

    keras.utils.set_random_seed(21)
    x = keras.Input(IMAGE, name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(x, keras.layers.Dense(3, name="logits")(h))
    root = tmp_path_factory.mktemp("oip-defaults")
    save_model(root, "cam", model)
    save_model(root, "configured", model)
    (root / "configured" / "config.toml").write_text('[explain]\ngrad_modifiers = ["negate"]\n')
    return root


@pytest.fixture(scope="module")
def server(repo: Path, server_factory: Any) -> RunningServer:
    running: RunningServer = server_factory(repo)
    return running


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def images() -> np.ndarray:
    return np.random.default_rng(3).random((2, *IMAGE), dtype=np.float32)


def infer(stub: Any, model: str, outputs: tuple[str, ...], method: str = "") -> Any:
    x = images()
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    request.parameters["filter_indices"].string_param = str(FILTER)
    if method:
        request.parameters["method"].string_param = method
    return stub.ModelInfer(request)


def maps(response: Any) -> dict[str, np.ndarray]:
    return {
        t.name: np.frombuffer(raw, "<f4").reshape(t.shape)
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@pytest.mark.parametrize(
    ("model", "method", "default", "other"),
    [
        ("configured", "", "negate", "none"),  # the model's config.toml
        ("configured", "gradcam", "negate", "absolute"),  # it wins over the method's
        ("cam", "", "absolute", "none"),  # vanilla's
        ("cam", "gradcam", "none", "absolute"),
        ("cam", "layercam", "relu", "none"),
    ],
)
def test_the_default_map_beside_others_is_explains_default(
    stub: Any,
    server: RunningServer,
    model: str,
    method: str,
    default: str,
    other: str,
) -> None:
    response = infer(stub, model, ("saliency", f"saliency/{other}"), method)
    assert response.parameters["grad_modifiers"].string_param == f"{default},{other}"
    got = maps(response)
    client: SalienceClient = server.client()
    options: dict[str, Any] = {"filter_indices": [FILTER]}
    if method:
        options["method"] = method
    alone = client.explain(model, images(), **options)
    # Explain with no grad modifier named gives exactly that one map.
    assert list(alone.maps) == [default]
    np.testing.assert_allclose(got["saliency"], alone.maps[default], rtol=1e-6, atol=1e-7)
    both = client.explain(model, images(), grad_modifiers=[default, other], **options)
    np.testing.assert_allclose(got[f"saliency/{other}"], both.maps[other], rtol=1e-6, atol=1e-7)
    assert np.abs(got["saliency"]).max() > 0


def test_an_unknown_method_beside_a_named_map_is_refused_by_name(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        infer(stub, "cam", ("saliency", "saliency/none"), "sharpen")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(
        "parameters['method']='sharpen' is unknown: use one of 'vanilla'"
    )
