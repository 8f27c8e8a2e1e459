"""Every malformed request gets a precise status and a message naming the field and
what is allowed — and the server keeps answering everyone else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import Objective, explanation_request
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE, build_repository

MAX_BATCH = 8
MAX_MESSAGE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory, server_factory: Any) -> Any:
    repo = build_repository(tmp_path_factory.mktemp("bad-input-repo"))
    running = server_factory(
        repo, max_batch_size=MAX_BATCH, max_message_bytes=MAX_MESSAGE, max_objectives=3
    )
    channel = grpc.insecure_channel(
        running.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    return salience_pb2_grpc.SalienceStub(channel)


def good_x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def explain(**options: Any) -> pb.ExplainRequest:
    model = options.pop("model", "linear")
    x = options.pop("x", good_x())
    return explanation_request(model, x, **options)


def predict(x: Any, model: str = "linear", version: int = 0) -> pb.PredictRequest:
    inputs = [x] if isinstance(x, pb.Tensor) else [tensors.encode(x)]
    return pb.PredictRequest(model=pb.ModelSpec(name=model, version=version), inputs=inputs)


def with_explanation(**fields: Any) -> pb.ExplainRequest:
    request = explain()
    for key, value in fields.items():
        if key == "wrt":
            request.explanation.wrt.name = value
        else:
            setattr(request.explanation, key, value)
    return request


def nan_input() -> np.ndarray:
    x = good_x(3)
    x[2, 1, 1, 0] = np.nan
    return x


def inf_input() -> np.ndarray:
    x = good_x(1)
    x[0, 0, 0, 2] = np.inf
    return x


def truncated() -> pb.Tensor:
    t = tensors.encode(good_x(1))
    t.data = t.data[:-4]
    return t


def raw_tensor(dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=[1, *LINEAR_SHAPE], data=b"\0" * 4 * 90)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES: list[tuple[str, str, Callable[[], Any], grpc.StatusCode, list[str]]] = [
    (
        "unknown model",
        "Predict",
        lambda: predict(good_x(), model="nope"),
        grpc.StatusCode.NOT_FOUND,
        ["model.name='nope'", "'linear'", "'smooth'"],
    ),
    (
        "unknown version",
        "Predict",
        lambda: predict(good_x(), version=7),
        grpc.StatusCode.NOT_FOUND,
        ["model.version=7", "choose one of 1"],
    ),
    (
        "wrong rank",
        "Predict",
        lambda: predict(good_x()[0]),
        INVALID,
        ["inputs['x'].shape=[6, 5, 3]", "rank 3", "takes rank 4", "['N', 6, 5, 3]"],
    ),
    (
        "wrong shape",
        "Predict",
        lambda: predict(np.zeros((1, 6, 5, 4), np.float32)),
        INVALID,
        ["inputs['x'].shape[3]=4", "['N', 6, 5, 3]"],
    ),
    (
        "wrong dtype",
        "Predict",
        lambda: predict(good_x().astype(np.float64)),
        INVALID,
        ["inputs['x'].dtype=float64", "takes float32"],
    ),
    (
        "empty batch",
        "Explain",
        lambda: explain(x=np.zeros((0, *LINEAR_SHAPE), np.float32)),
        INVALID,
        ["inputs['x'] is an empty batch"],
    ),
    (
        "no inputs",
        "Predict",
        lambda: pb.PredictRequest(model=pb.ModelSpec(name="linear")),
        INVALID,
        ["inputs is empty"],
    ),
    ("NaN", "Explain", lambda: explain(x=nan_input()), INVALID, ["NaN or infinite", "sample 2"]),
    ("infinity", "Predict", lambda: predict(inf_input()), INVALID, ["NaN or infinite", "sample 0"]),
    (
        "byte length",
        "Predict",
        lambda: predict(truncated()),
        INVALID,
        ["inputs[0].data has 356 bytes", "float32", "needs 360"],
    ),
    (
        "unknown dtype",
        "Predict",
        lambda: predict(raw_tensor(42)),
        INVALID,
        ["inputs[0].dtype=<unknown dtype 42>", "float32"],
    ),
    (
        "unknown input name",
        "Predict",
        lambda: pb.PredictRequest(
            model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(good_x(), "image")]
        ),
        INVALID,
        ["'image'", "its inputs are 'x'"],
    ),
    (
        "batch over limit",
        "Explain",
        lambda: explain(x=good_x(MAX_BATCH + 1)),
        INVALID,
        [f"batch of {MAX_BATCH + 1}", f"max_batch_size={MAX_BATCH}"],
    ),
    (
        "unknown layer",
        "Explain",
        lambda: explain(layer="conv9"),
        INVALID,
        ["objectives[0].layer.name='conv9'", "'logits'"],
    ),
    (
        "layer index",
        "Explain",
        lambda: explain(layer=12),
        INVALID,
        ["objectives[0].layer.index=12", "3 layers", "-3..2"],
    ),
    ("input layer", "Explain", lambda: explain(layer=0), INVALID, ["input layer 'x'"]),
    (
        "filter index",
        "Explain",
        lambda: explain(objectives=[Objective("logits", [0]), Objective("logits", [1, 12])]),
        INVALID,
        ["objectives[1].filter_indices[1]=12", "layer 'logits' has 4 units", "0..3"],
    ),
    (
        "negative filter index",
        "Explain",
        lambda: explain(filter_indices=[-1]),
        INVALID,
        ["filter_indices[0]=-1", "0..3"],
    ),
    (
        "unknown modifier",
        "Explain",
        lambda: explain(grad_modifiers=["absolute", "sqrt"]),
        INVALID,
        ["grad_modifiers[1]='sqrt'", "'small_values'", "'negate'"],
    ),
    (
        "repeated modifier",
        "Explain",
        lambda: explain(grad_modifiers=["none", "none"]),
        INVALID,
        ["grad_modifiers[1]='none' is listed twice"],
    ),
    (
        "unknown method",
        "Explain",
        lambda: explain(method="lime"),
        INVALID,
        ["method='lime'", "'vanilla'", "'gradcam'"],
    ),
    (
        "method the model cannot support",
        "Explain",
        lambda: explain(method="gradcam"),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["method='gradcam' cannot explain model 'linear'", "spatial extent larger than 1×1"],
    ),
    (
        "backprop modifier the model cannot take",
        "Explain",
        lambda: explain(model="smooth", x=np.zeros((1, *SMOOTH_SHAPE)), backprop_modifier="guided"),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["backprop_modifier='guided' cannot be used", "'conv2' (activation 'softplus')"],
    ),
    (
        "unknown backprop modifier",
        "Explain",
        lambda: with_explanation(backprop_modifier="x"),
        INVALID,
        ["backprop_modifier='x'", "'rectified'"],
    ),
    (
        "wrt a layer the target does not depend on",
        "Explain",
        lambda: explain(layer="flatten", wrt="logits"),
        INVALID,
        ["explanation.wrt.name='logits'", "does not depend", "choose one of 'x', 'flatten'"],
    ),
    (
        "uint8 raw",
        "Explain",
        lambda: explain(output_dtype="uint8", normalize=False),
        INVALID,
        ["output_dtype=uint8 needs normalize=true"],
    ),
    (
        "int map dtype",
        "Explain",
        lambda: explain(output_dtype="int32"),
        INVALID,
        ["output_dtype=int32", "'float32', 'float16', 'uint8'"],
    ),
    (
        "too many objectives",
        "Explain",
        lambda: explain(objectives=[Objective()] * 4),
        INVALID,
        ["objectives has 4 entries", "max_objectives=3"],
    ),
    (
        "unknown explained input",
        "Explain",
        lambda: explain(input_name="y"),
        INVALID,
        ["explanation.input='y'", "'x'"],
    ),
    (
        "infinite weight",
        "Explain",
        lambda: explain(objectives=[Objective(weight=float("inf"))]),
        INVALID,
        ["objectives[0].weight=inf"],
    ),
]


@pytest.mark.parametrize(
    ("rpc", "build", "code", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_precise_status_and_message(
    stub: Any, rpc: str, build: Callable[[], Any], code: grpc.StatusCode, fragments: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(build(), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    # ... and the server goes on serving everyone else.
    response = stub.Predict(predict(good_x(1)), timeout=30)
    assert response.outputs[0].shape == [1, 4]


def test_message_over_the_size_limit_is_refused(stub: Any) -> None:
    big = np.zeros((MAX_BATCH, 6, 5, 3 * 10_000), np.float32)  # ~29 MB > 4 MiB limit
    request = pb.PredictRequest(model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(big)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE) in caught.value.details()
    assert stub.Predict(predict(good_x(1)), timeout=30).outputs[0].shape == [1, 4]


def test_metadata_of_unknown_model_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelMetadata(
            pb.GetModelMetadataRequest(model=pb.ModelSpec(name="linear", version=3)), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model.version=3" in caught.value.details()
