"""uint8 images on the wire (`[inputs.<name>] wire_dtypes` of config.toml), on a real
server: a uint8 request gets the predictions and maps of the float32 request it stands
for, carries a quarter of the bytes, is cast inside the compiled functions (traced at
warm-up, never again), and a dtype the input does not accept is refused by name.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience_client import SalienceClient, SalienceError
from tests.conftest import RunningServer

IMAGE = (8, 8, 3)
# A float32 of a uint8 p divided by 255 in float32 is what the client reads an image
# file as, and what the server's cast computes: equal bit for bit, so the only
# differences left are those of the device's arithmetic.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from tests.conftest import save_model

    keras.utils.set_random_seed(16)
    x = keras.Input(IMAGE, name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="probs")(h))
    root = tmp_path_factory.mktemp("wire-repo")
    for name in ("unit", "raw", "plain", "resized"):
        save_model(root, name, model)
    model.export(str(root / "saved" / "1"), verbose=False)

    def config(name: str, text: str) -> None:
        (root / name / "config.toml").write_text(textwrap.dedent(text))

    # uint8 p stands for the float p / 255, the [0, 1] image a float sender sends.
    config("unit", '[inputs.image]\nwire_dtypes = ["uint8"]\nwire_range = "unit"\n')
    config("saved", '[inputs.image]\nwire_dtypes = ["uint8"]\nwire_range = "unit"\n')
    # uint8 p stands for the float p; [preprocess] scales both to the model's range.
    config(
        "raw",
        """
        [preprocess]
        scale = 0.00784313725490196
        offset = -1.0

        [inputs.image]
        wire_dtypes = ["uint8"]
        """,
    )
    config(
        "resized",
        """
        [preprocess]
        resize = "bilinear"

        [inputs.image]
        wire_dtypes = ["uint8"]
        wire_range = "unit"
        """,
    )
    return root


@pytest.fixture(scope="module")
def server(repo: Path, server_factory: Any) -> RunningServer:
    running: RunningServer = server_factory(repo, batch_buckets=(1, 4), max_device_batch_size=4)
    return running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> SalienceClient:
    return server.client()


def pixels(n: int = 3, shape: tuple[int, ...] = IMAGE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def unit(p: np.ndarray) -> np.ndarray:
    """The client's float reading of an image (salience_client.images)."""
    return p.astype(np.float32) / np.float32(255)


EXPLANATIONS: list[dict[str, Any]] = [
    {"method": "vanilla", "grad_modifiers": ["none", "absolute"], "normalize": False},
    {"method": "smoothgrad", "samples": 4, "seed": 7, "normalize": False},
    {"method": "integrated-gradients", "steps": 8, "normalize": False},
    {"method": "gradient-x-input", "normalize": False, "keepdims": True},
    {"method": "gradcam", "normalize": False},
    {"method": "vanilla", "output_dtype": "uint8"},
]


@pytest.mark.parametrize("options", EXPLANATIONS, ids=lambda o: o["method"])
def test_uint8_gets_the_predictions_and_maps_of_the_float_image(
    client: SalienceClient, options: dict[str, Any]
) -> None:
    p = pixels()
    as_uint8 = client.explain("unit", p, filter_indices=[1], **options)
    as_float = client.explain("unit", unit(p), filter_indices=[1], **options)
    np.testing.assert_allclose(as_uint8.predictions, as_float.predictions, rtol=RTOL, atol=ATOL)
    assert as_uint8.maps.keys() == as_float.maps.keys()
    for name, saliency in as_float.maps.items():
        # Maps are with respect to the float input the cast makes: shaped like it.
        assert as_uint8.maps[name].shape == saliency.shape
        assert as_uint8.maps[name].dtype == saliency.dtype
        if saliency.dtype == np.uint8:
            assert np.abs(as_uint8.maps[name].astype(int) - saliency).max() <= 1
        else:
            np.testing.assert_allclose(as_uint8.maps[name], saliency, rtol=1e-4, atol=1e-6)
        assert np.abs(saliency.astype(np.float64)).max() > 0


def test_a_saved_model_takes_uint8_alike(client: SalienceClient) -> None:
    p = pixels(seed=4)
    got = client.explain("saved", p, filter_indices=[1], normalize=False)
    want = client.explain("saved", unit(p), filter_indices=[1], normalize=False)
    np.testing.assert_allclose(got.predictions, want.predictions, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.maps["absolute"], want.maps["absolute"], rtol=1e-4, atol=1e-7)
    keras_model = client.predict("unit", p).predictions
    np.testing.assert_allclose(got.predictions, keras_model, rtol=1e-5, atol=1e-6)


def test_uint8_predict_equals_float_predict(client: SalienceClient) -> None:
    p = pixels(5, seed=1)  # over the largest bucket: split into two device calls
    got = client.predict("unit", p).predictions
    want = client.predict("unit", unit(p)).predictions
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # Not a constant model: the images get different answers.
    assert np.ptp(want, axis=0).max() > 1e-4


def test_raw_range_scales_with_preprocess(client: SalienceClient) -> None:
    # raw: p reaches [preprocess] as the float p, which scales it to [-1, 1].
    p = pixels(seed=2)
    got = client.explain("raw", p, filter_indices=[0], normalize=False)
    want = client.explain("raw", p.astype(np.float32), filter_indices=[0], normalize=False)
    np.testing.assert_allclose(got.predictions, want.predictions, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.maps["absolute"], want.maps["absolute"], rtol=1e-4, atol=1e-7)
    # The same model fed [-1, 1] by hand predicts the same.
    by_hand = client.predict("plain", p.astype(np.float32) * np.float32(2 / 255) - 1).predictions
    np.testing.assert_allclose(got.predictions, by_hand, rtol=1e-4, atol=1e-6)


def test_resized_uint8_maps_have_the_senders_shape(client: SalienceClient) -> None:
    p = pixels(2, (12, 10, 3), seed=3)
    got = client.explain("resized", p, filter_indices=[2], normalize=False, keepdims=True)
    want = client.explain("resized", unit(p), filter_indices=[2], normalize=False, keepdims=True)
    assert got.maps["absolute"].shape == (2, 12, 10, 3)
    np.testing.assert_allclose(got.maps["absolute"], want.maps["absolute"], rtol=1e-4, atol=1e-7)


def test_uint8_and_float_requests_batched_together_keep_their_rows(server: RunningServer) -> None:
    # Concurrent requests of both dtypes: each is computed in a device call of its own
    # dtype and gets its own rows.
    import asyncio

    from salience_client.aio import AsyncSalienceClient

    images = [pixels(1, seed=10 + k) for k in range(8)]

    async def go() -> list[Any]:
        async with AsyncSalienceClient(server.target) as client:
            calls = [client.predict("unit", p if k % 2 else unit(p)) for k, p in enumerate(images)]
            alone = [await client.predict("unit", unit(p)) for p in images]
            return [*(await asyncio.gather(*calls)), *alone]

    results = asyncio.run(go())
    mixed, alone = results[:8], results[8:]
    for got, want in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(got.predictions, want.predictions, rtol=RTOL, atol=ATOL)


def test_the_cast_is_compiled_at_warm_up_and_never_traced_again(
    server: RunningServer, client: SalienceClient
) -> None:
    runtime = server.server.core.repository.get("unit")
    traces = runtime.traces
    # Warm-up compiled the uint8 functions of predict and the default explanation,
    # whose signature takes uint8: the uint8 tensor is what goes to the device.
    assert set(runtime._wire_predicts) == {("uint8",)}
    for fn in runtime._wire_predicts.values():
        assert [spec.dtype.name for spec in fn.input_signature[0]] == ["uint8"]
    wire = [key for key in runtime._wire_functions if key[1] == ("uint8",)]
    assert wire, "warm-up compiled no uint8 explanation"
    for _, wrapped in runtime._wire_functions.values():
        assert [spec.dtype.name for spec in wrapped.input_signature[0]] == ["uint8"]
    for n in (1, 4):
        client.explain("unit", pixels(n), filter_indices=[1])
        client.explain("unit", unit(pixels(n)), filter_indices=[1])
        client.predict("unit", pixels(n))
    # The gradient function is traced once for both dtypes: the uint8 one calls it.
    assert runtime.traces == traces


def request_bytes(server: RunningServer, rpc: str) -> tuple[float, float]:
    """(sum, count) of the server's salience_request_bytes for one RPC."""
    from prometheus_client import CollectorRegistry

    registry: CollectorRegistry = server.server.metrics.registry
    total = registry.get_sample_value("salience_request_bytes_sum", {"rpc": rpc}) or 0.0
    count = registry.get_sample_value("salience_request_bytes_count", {"rpc": rpc}) or 0.0
    return total, count


def test_a_uint8_request_is_a_quarter_of_the_bytes(server: RunningServer) -> None:
    client = server.client()
    p = pixels(4, (64, 64, 3), seed=5)
    sizes = {}
    for name, x in (("float32", unit(p)), ("uint8", p)):
        before = request_bytes(server, "Predict")
        client.predict("resized", x)  # any image size
        after = request_bytes(server, "Predict")
        assert after[1] == before[1] + 1
        sizes[name] = after[0] - before[0]
    pixel_bytes = p.size
    # Measured by the server: the tensor bytes plus a few dozen of framing.
    assert pixel_bytes <= sizes["uint8"] < pixel_bytes + 200
    assert 4 * pixel_bytes <= sizes["float32"] < 4 * pixel_bytes + 200
    assert sizes["float32"] / sizes["uint8"] > 3.9


def test_metadata_lists_the_accepted_dtypes(client: SalienceClient) -> None:
    spec = client.metadata("unit").inputs[0]
    assert spec.dtype == pb.DATA_TYPE_FLOAT32
    assert list(spec.accepted_dtypes) == [pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UINT8]
    assert spec.wire_range == "unit"
    assert client.metadata("raw").inputs[0].wire_range == "raw"
    plain = client.metadata("plain").inputs[0]
    assert list(plain.accepted_dtypes) == [pb.DATA_TYPE_FLOAT32]
    assert plain.wire_range == ""
    # Outputs accept nothing: the field is for inputs.
    assert not client.metadata("unit").outputs[0].accepted_dtypes


@pytest.mark.parametrize(
    ("model", "array", "message"),
    [
        (
            "unit",
            np.zeros((1, *IMAGE), np.int32),
            "inputs['image'].dtype=int32 is not accepted: input 'image' of model 'unit' "
            "takes float32 or uint8",
        ),
        (
            "unit",
            np.zeros((1, *IMAGE), np.float16),
            "inputs['image'].dtype=float16 is not accepted: input 'image' of model 'unit' "
            "takes float32 or uint8",
        ),
        (
            "plain",
            np.zeros((1, *IMAGE), np.uint8),
            "inputs['image'].dtype=uint8 is not accepted: input 'image' of model 'plain' "
            "takes float32",
        ),
    ],
)
def test_a_dtype_the_input_does_not_accept_is_refused_by_name(
    client: SalienceClient, model: str, array: np.ndarray, message: str
) -> None:
    for call in (client.predict, client.explain):
        with pytest.raises(SalienceError) as caught:
            call(model, array)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details == message
    # The server keeps serving.
    assert client.predict(model, np.zeros((1, *IMAGE), np.float32)).predictions.shape == (1, 3)


def test_a_wire_input_that_is_not_an_input_fails_the_model_only(
    tmp_path: Path, server_factory: Any
) -> None:
    import keras

    from tests.conftest import save_model

    x = keras.Input((4,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, name="y")(x))
    for name in ("typo", "fine"):
        save_model(tmp_path, name, model)
    (tmp_path / "typo" / "config.toml").write_text('[inputs.image]\nwire_dtypes = ["uint8"]\n')
    client = server_factory(tmp_path).client()
    assert client.predict("fine", np.zeros((1, 4), np.float32)).predictions.shape == (1, 2)
    with pytest.raises(SalienceError) as caught:
        client.predict("typo", np.zeros((1, 4), np.float32))
    assert "inputs.image is not an input of the model: choose one of 'x'" in str(
        caught.value.details
    )


def test_wire_dtypes_apply_to_floating_point_inputs_only() -> None:
    from salience_server.model_config import ModelConfigError, parse_model_config
    from salience_server.preprocess import WireCast
    from salience_server.seam import TensorInfo

    config = parse_model_config({"inputs": {"ids": {"wire_dtypes": ["uint8"]}}})
    with pytest.raises(ModelConfigError) as caught:
        WireCast(config, [TensorInfo("ids", "int32", (None, 4))])
    assert str(caught.value) == (
        "inputs.ids.wire_dtypes has 'uint8', which does not cast exactly to the input's "
        "dtype int32: wire dtypes apply to floating-point inputs"
    )


def test_the_unit_cast_divides_as_the_client_reads_images() -> None:
    import tensorflow as tf

    from salience_server.model_config import parse_model_config
    from salience_server.preprocess import WireCast
    from salience_server.seam import TensorInfo

    config = parse_model_config(
        {"inputs": {"image": {"wire_dtypes": ["uint8"], "wire_range": "unit"}}}
    )
    cast = WireCast(config, [TensorInfo("image", "float32", (None, 16, 16))])
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    (got,) = cast.cast([tf.constant(every)])
    # Bit for bit the floats of an image file read by the client.
    np.testing.assert_array_equal(got.numpy(), unit(every))
    (same,) = cast.cast([tf.constant(unit(every))])
    np.testing.assert_array_equal(same.numpy(), unit(every))


# The Open Inference Protocol: metadata lists what an input accepts, ModelInfer takes it.


@pytest.fixture(scope="module")
def oip_stub(server: RunningServer) -> Iterator[Any]:
    from inference.v2 import grpc_service_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _oip_request(model: str, array: np.ndarray, datatype: str, *outputs: str) -> Any:
    from inference.v2 import grpc_service_pb2 as oip

    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _oip_output(response: Any, name: str) -> np.ndarray:
    k = [t.name for t in response.outputs].index(name)
    tensor = response.outputs[k]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[k], "<f4").reshape(tensor.shape)


def test_oip_metadata_lists_the_datatypes_an_input_accepts(oip_stub: Any) -> None:
    from inference.v2 import grpc_service_pb2 as oip

    stub = oip_stub
    for model, wire_range in (("unit", "unit"), ("raw", "raw"), ("saved", "unit")):
        (image,) = stub.ModelMetadata(oip.ModelMetadataRequest(name=model)).inputs
        # The model's datatype stays the tensor's: clients built from the published
        # schema see FP32 as before.
        assert (image.name, image.datatype, list(image.shape)) == ("image", "FP32", [-1, 8, 8, 3])
        assert dict(image.parameters) == {
            "accepted_datatypes": oip.InferParameter(string_param="FP32,UINT8"),
            "wire_range": oip.InferParameter(string_param=wire_range),
        }
    # An input that takes only its model's datatype has no parameters.
    (plain,) = stub.ModelMetadata(oip.ModelMetadataRequest(name="plain")).inputs
    assert (plain.datatype, len(plain.parameters)) == ("FP32", 0)
    # Outputs never have any.
    (probs,) = stub.ModelMetadata(oip.ModelMetadataRequest(name="unit")).outputs
    assert (probs.datatype, len(probs.parameters)) == ("FP32", 0)


def test_oip_uint8_infer_gets_the_float_images_predictions_and_map(
    oip_stub: Any, client: SalienceClient
) -> None:
    stub = oip_stub
    p = pixels(3, seed=5)
    got = stub.ModelInfer(_oip_request("unit", p, "UINT8", "probs", "saliency"))
    want = stub.ModelInfer(_oip_request("unit", unit(p), "FP32", "probs", "saliency"))
    np.testing.assert_allclose(
        _oip_output(got, "probs"), _oip_output(want, "probs"), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        _oip_output(got, "probs"), client.predict("unit", unit(p)).predictions, rtol=RTOL, atol=ATOL
    )
    saliency = _oip_output(want, "saliency")
    assert saliency.shape == (3, 8, 8)
    assert np.abs(saliency).max() > 0
    np.testing.assert_allclose(_oip_output(got, "saliency"), saliency, rtol=1e-4, atol=1e-6)


def test_oip_refuses_a_datatype_the_input_does_not_accept(oip_stub: Any) -> None:
    stub = oip_stub
    ints = pixels(1).astype(np.int32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_oip_request("unit", ints, "INT32"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "inputs[0].datatype='INT32' is not accepted: input 'image' of model 'unit' takes "
        "FP32 or UINT8"
    )
    # Without wire dtypes, UINT8 is refused naming the one datatype the input takes.
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_oip_request("plain", pixels(1), "UINT8"))
    assert caught.value.details() == (
        "inputs[0].datatype='UINT8' is not accepted: input 'image' of model 'plain' takes FP32"
    )
