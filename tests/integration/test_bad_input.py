"""Every malformed request gets a precise status and a message naming the field and
what is allowed — and the server keeps answering everyone else, correctly.

Each entry of `CASES` (refused) and `TOLERATED` (answered) is a row of the table
in docs/bad-input.md under the same id; `test_bad_input_table.py` keeps the two in
step. After every case a valid Predict and Explain of `linear` must still get their
closed-form values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.client import Objective, explanation_request
from tests.integration.bad_requests import (
    PAIR_SHAPES,
    Linear,
    build_bad_input_repository,
    call_raw,
    check_still_serving,
    wire_dtype,
)
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE

MAX_BATCH = 8
MAX_MESSAGE = 4 * 1024 * 1024
MAX_OBJECTIVES = 3
MAX_FILTER_INDICES = 16
MAX_FREE_AXIS = 64
LONG = 100_000  # characters of an over-long name
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bad_input_repository(tmp_path_factory.mktemp("bad-input-repo"))


@pytest.fixture(scope="module")
def channel(repo: Path, server_factory: Any) -> grpc.Channel:
    running = server_factory(
        repo,
        max_batch_size=MAX_BATCH,
        max_message_bytes=MAX_MESSAGE,
        max_objectives=MAX_OBJECTIVES,
        max_filter_indices=MAX_FILTER_INDICES,
        max_free_axis_size=MAX_FREE_AXIS,
    )
    return grpc.insecure_channel(
        running.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    return salience_pb2_grpc.SalienceStub(channel)


@pytest.fixture(scope="module")
def linear(repo: Path) -> Linear:
    return Linear.load(repo)


def good_x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, *LINEAR_SHAPE)).astype(np.float32)


def explain(**options: Any) -> pb.ExplainRequest:
    """An explanation request; `x` may be an array or a raw Tensor message."""
    model = options.pop("model", "linear")
    x = options.pop("x", good_x())
    if isinstance(x, pb.Tensor):
        request = explanation_request(model, good_x(), **options)
        request.inputs[0].CopyFrom(x)
        return request
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


def edited(edit: Callable[[pb.Explanation], Any], **options: Any) -> pb.ExplainRequest:
    """An explanation request with `edit` applied to its Explanation message, for
    values the client's keyword arguments cannot express.
    """
    request = explain(**options)
    edit(request.explanation)
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
    return pb.Tensor(dtype=wire_dtype(dtype), shape=[1, *LINEAR_SHAPE], data=b"\0" * 4 * 90)


def tensor(shape: list[int], data: bytes = b"", dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.Tensor:
    return pb.Tensor(dtype=wire_dtype(dtype), shape=shape, data=data)


def metadata(name: str = "linear", version: int = 0) -> pb.GetModelMetadataRequest:
    return pb.GetModelMetadataRequest(model=pb.ModelSpec(name=name, version=version))


def pair(batches: dict[str, int]) -> list[pb.Tensor]:
    return [
        tensors.encode(np.ones((n, *PAIR_SHAPES[name]), np.float32), name)
        for name, n in batches.items()
    ]


def baseline(t: pb.Tensor) -> Callable[[pb.Explanation], Any]:
    return lambda e: e.baseline.CopyFrom(t)


def cut_in_half() -> bytes:
    """A valid ExplainRequest's bytes, cut in the middle of its input tensor."""
    data = explain().SerializeToString()
    return data[: len(data) // 2]


# (id, RPC, request: a message, or bytes sent as they are, status, message fragments)
Case = tuple[str, str, Callable[[], Any], grpc.StatusCode, list[str]]
CASES: list[Case] = [
    (
        "unknown model",
        "Predict",
        lambda: predict(good_x(), model="nope"),
        NOT_FOUND,
        ["model.name='nope'", "'linear'", "'smooth'"],
    ),
    (
        "unknown version",
        "Predict",
        lambda: predict(good_x(), version=7),
        NOT_FOUND,
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
    # The model: names, versions.
    (
        "no model",
        "Predict",
        lambda: pb.PredictRequest(inputs=[tensors.encode(good_x())]),
        INVALID,
        ["model.name='' is not a valid model name", NAME_PATTERN],
    ),
    (
        "model name with a path",
        "Predict",
        lambda: predict(good_x(), model="../shapes"),
        INVALID,
        ["model.name='../shapes' is not a valid model name", NAME_PATTERN],
    ),
    (
        "model name with a slash",
        "Explain",
        lambda: explain(model="a/b"),
        INVALID,
        ["model.name='a/b' is not a valid model name", NAME_PATTERN],
    ),
    (
        "model name with NUL",
        "Predict",
        lambda: predict(good_x(), model="\x00"),
        INVALID,
        ["model.name='\\x00' is not a valid model name", NAME_PATTERN],
    ),
    (
        "model name over 128 characters",
        "Predict",
        lambda: predict(good_x(), model="m" * 129),
        INVALID,
        ["model.name='mmm", "use 1 to 128 letters"],
    ),
    (
        "model name of 100000 characters",
        "Explain",
        lambda: explain(model="m" * LONG),
        INVALID,
        [f"model.name has {LONG} characters", "use at most 256"],
    ),
    (
        "negative version",
        "Predict",
        lambda: predict(good_x(), version=-1),
        INVALID,
        ["model.version=-1 is not allowed", "a positive version, or 0 for the highest"],
    ),
    (
        "huge version",
        "Explain",
        lambda: explain(version=2**62),
        NOT_FOUND,
        [f"model.version={2**62} of model 'linear' is not served", "choose one of 1"],
    ),
    (
        "metadata without model",
        "GetModelMetadata",
        lambda: pb.GetModelMetadataRequest(),
        INVALID,
        ["model.name='' is not a valid model name", NAME_PATTERN],
    ),
    (
        "metadata of unknown model",
        "GetModelMetadata",
        lambda: metadata("nope"),
        NOT_FOUND,
        ["model.name='nope' is not served", "'linear'", "'pair'"],
    ),
    (
        "metadata of unknown version",
        "GetModelMetadata",
        lambda: metadata(version=3),
        NOT_FOUND,
        ["model.version=3", "choose one of 1"],
    ),
    (
        "metadata of negative version",
        "GetModelMetadata",
        lambda: metadata(version=-(2**63)),
        INVALID,
        [f"model.version={-(2**63)} is not allowed", "0 for the highest"],
    ),
    (
        "metadata with a path",
        "GetModelMetadata",
        lambda: metadata("a/b"),
        INVALID,
        ["model.name='a/b' is not a valid model name", NAME_PATTERN],
    ),
    (
        "metadata name of 100000 characters",
        "GetModelMetadata",
        lambda: metadata("m" * LONG),
        INVALID,
        [f"model.name has {LONG} characters", "use at most 256"],
    ),
    # Tensors: dtype, shape, bytes.
    (
        "DataType 99",
        "Predict",
        lambda: predict(raw_tensor(99)),
        INVALID,
        ["inputs[0].dtype=<unknown dtype 99> is not supported", "float32, float16"],
    ),
    (
        "unspecified dtype",
        "Explain",
        lambda: explain(x=tensor([1, *LINEAR_SHAPE], b"\0" * 360, dtype=0)),
        INVALID,
        ["inputs[0].dtype=<unknown dtype 0> is not supported", "float32, float16"],
    ),
    (
        "int32 input",
        "Predict",
        lambda: predict(np.zeros((1, *LINEAR_SHAPE), np.int32)),
        INVALID,
        ["inputs['x'].dtype=int32 is not accepted", "takes float32"],
    ),
    (
        "scalar input",
        "Predict",
        lambda: predict(tensor([], b"\0" * 4)),
        INVALID,
        ["inputs['x'].shape=[] has rank 0", "takes rank 4", "['N', 6, 5, 3]"],
    ),
    (
        "negative dimension",
        "Predict",
        lambda: predict(tensor([1, -6, 5, 3])),
        INVALID,
        ["inputs[0].shape=[1, -6, 5, 3] has a negative dimension", "sizes of 0 or more"],
    ),
    (
        "dimension of 2**40",
        "Predict",
        lambda: predict(tensor([1, 2**40, 5, 3], b"\0" * 360)),
        INVALID,
        ["inputs[0].data has 360 bytes", f"shape [1, {2**40}, 5, 3] needs {2**40 * 60}"],
    ),
    (
        "shape product over int64",
        "Predict",
        # 2**32 · 2**32 · 4 bytes wraps to 0 in int64: the exact product needs no bytes less.
        lambda: predict(tensor([2**32, 2**32, 1, 1])),
        INVALID,
        ["inputs[0].data has 0 bytes", f"needs {2**66}"],
    ),
    (
        "empty tensor with huge axes",
        "Explain",
        lambda: explain(x=tensor([0, 2**62, 5, 3])),
        INVALID,
        [f"inputs[0].shape=[0, {2**62}, 5, 3] is empty", "at most 2147483648 bytes"],
    ),
    (
        "too many axes",
        "Predict",
        lambda: predict(tensor([1] * 100, b"\0" * 4)),
        INVALID,
        ["inputs[0].shape has 100 axes", "use at most 32"],
    ),
    (
        "bytes longer than declared",
        "Explain",
        lambda: explain(x=tensor([1, *LINEAR_SHAPE], b"\0" * 364)),
        INVALID,
        ["inputs[0].data has 364 bytes", "× shape [1, 6, 5, 3] needs 360"],
    ),
    (
        "no bytes",
        "Predict",
        lambda: predict(tensor([2, *LINEAR_SHAPE])),
        INVALID,
        ["inputs[0].data has 0 bytes", "needs 720"],
    ),
    (
        "negative infinity",
        "Predict",
        lambda: predict(np.full((2, *LINEAR_SHAPE), -np.inf, np.float32)),
        INVALID,
        ["inputs['x'] holds NaN or infinite values (first in sample 0)", "only finite"],
    ),
    (
        "batch over the queue size",
        "Predict",
        # Refused as too large a batch, not as a full queue: retrying could never help.
        lambda: predict(good_x(300)),
        INVALID,
        ["inputs['x'] has a batch of 300", f"max_batch_size={MAX_BATCH}"],
    ),
    (
        "input given twice",
        "Predict",
        lambda: pb.PredictRequest(
            model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(good_x(), "x")] * 2
        ),
        INVALID,
        ["inputs[1].name='x' is given twice"],
    ),
    (
        "too many tensors",
        "Predict",
        lambda: pb.PredictRequest(
            model=pb.ModelSpec(name="linear"), inputs=[pb.Tensor(name=str(k)) for k in range(2000)]
        ),
        INVALID,
        ["inputs has 2000 tensors", "at most 1024"],
    ),
    (
        "input name of 100000 characters",
        "Predict",
        lambda: pb.PredictRequest(
            model=pb.ModelSpec(name="linear"), inputs=[tensors.encode(good_x(), "x" * LONG)]
        ),
        INVALID,
        [f"inputs[0].name has {LONG} characters", "use at most 256"],
    ),
    (
        "missing input",
        "Predict",
        lambda: pb.PredictRequest(model=pb.ModelSpec(name="pair"), inputs=pair({"a": 1})),
        INVALID,
        ["inputs lack 'b'", "model 'pair' takes 'a', 'b'"],
    ),
    (
        "inputs of different batches",
        "Predict",
        lambda: pb.PredictRequest(model=pb.ModelSpec(name="pair"), inputs=pair({"a": 2, "b": 1})),
        INVALID,
        ["inputs['b'] has batch 1 but an earlier input has 2", "the same batch size"],
    ),
    (
        "empty free axis",
        "Predict",
        lambda: predict(tensor([1, 0, 4, 3]), model="valid"),
        INVALID,
        ["inputs['image'].shape[1]=0 is empty", "['N', 'any', 'any', 3]"],
    ),
    (
        "free axis over the limit",
        "Explain",
        lambda: explain(model="valid", x=np.zeros((1, 8, MAX_FREE_AXIS + 1, 3), np.float32)),
        INVALID,
        [
            f"inputs['image'].shape[2]={MAX_FREE_AXIS + 1} is over the server's "
            f"max_free_axis_size={MAX_FREE_AXIS}",
            f"at most {MAX_FREE_AXIS} along each free axis",
        ],
    ),
    (
        "free axes too small for the layers",
        "Predict",
        lambda: predict(np.zeros((1, 1, 1, 3), np.float32), model="valid"),
        INVALID,
        ["inputs do not fit model 'valid'", "output size would be negative", "GetModelMetadata"],
    ),
    (
        "free axes too small to explain",
        "Explain",
        lambda: explain(model="valid", x=np.zeros((1, 2, 5, 3), np.float32)),
        INVALID,
        ["inputs do not fit model 'valid': its layers fail on them", "GetModelMetadata"],
    ),
    # Explanation options.
    (
        "explained input required",
        "Explain",
        lambda: pb.ExplainRequest(model=pb.ModelSpec(name="pair"), inputs=pair({"a": 1, "b": 1})),
        INVALID,
        ["explanation.input is required", "model 'pair' has inputs 'a', 'b'"],
    ),
    (
        "method of 100000 characters",
        "Explain",
        lambda: explain(method="m" * LONG),
        INVALID,
        [f"explanation.method has {LONG} characters", "use at most 256"],
    ),
    (
        "objectives by the hundred thousand",
        "Explain",
        lambda: explain(objectives=[Objective()] * LONG),
        INVALID,
        [f"explanation.objectives has {LONG} entries", f"max_objectives={MAX_OBJECTIVES}"],
    ),
    (
        "too many filter indices",
        "Explain",
        lambda: explain(filter_indices=[0] * (MAX_FILTER_INDICES + 1)),
        INVALID,
        [
            f"objectives[0].filter_indices has {MAX_FILTER_INDICES + 1} entries",
            f"max_filter_indices={MAX_FILTER_INDICES}",
        ],
    ),
    (
        "filter indices by the million",
        "Explain",
        lambda: explain(objectives=[Objective(), Objective(filter_indices=[1] * 1_000_000)]),
        INVALID,
        ["objectives[1].filter_indices has 1000000 entries", "max_filter_indices="],
    ),
    (
        "randomization over the weighted layers",
        "Explain",
        lambda: explain(randomize_layers=2, randomize_seed=3),
        INVALID,
        [
            "explanation.randomization.layers=2 is over the 1 weighted layers of model "
            "'linear' (logits, from the output down): use 1..1, or 0 for the trained model"
        ],
    ),
    (
        "filter index of 2**63-1",
        "Explain",
        lambda: explain(filter_indices=[2**63 - 1]),
        INVALID,
        [f"filter_indices[0]={2**63 - 1} is out of range", "4 units (valid 0..3)"],
    ),
    (
        "filter index of another layer",
        "Explain",
        lambda: explain(layer="flatten", filter_indices=[90]),
        INVALID,
        ["filter_indices[0]=90 is out of range", "layer 'flatten' has 90 units (valid 0..89)"],
    ),
    (
        "layer index of -2**31",
        "Explain",
        lambda: explain(layer=-(2**31)),
        INVALID,
        [f"objectives[0].layer.index={-(2**31)} is out of range", "(valid -3..2)"],
    ),
    (
        "empty layer name",
        "Explain",
        lambda: explain(layer=""),
        INVALID,
        ["objectives[0].layer.name='' is not a layer", "'x', 'flatten', 'logits'"],
    ),
    (
        "layer name of 100000 characters",
        "Explain",
        lambda: explain(layer="l" * LONG),
        INVALID,
        [f"explanation.objectives[0].layer.name has {LONG} characters", "use at most 256"],
    ),
    (
        "NaN weight",
        "Explain",
        lambda: explain(objectives=[Objective(weight=float("nan"))]),
        INVALID,
        ["objectives[0].weight=nan is not allowed", "finite value"],
    ),
    (
        "weight beyond float32",
        "Explain",
        lambda: explain(objectives=[Objective(), Objective(weight=-1e39)]),
        INVALID,
        ["objectives[1].weight=-1e+39 is not allowed", "magnitude at most 3.402823e+38"],
    ),
    (
        "grad modifiers by the thousand",
        "Explain",
        lambda: explain(grad_modifiers=["none"] * 1000),
        INVALID,
        ["explanation.grad_modifiers has 1000 entries", "list each once", "'absolute'"],
    ),
    (
        "grad modifier of 100000 characters",
        "Explain",
        lambda: explain(grad_modifiers=["none", "g" * LONG]),
        INVALID,
        [f"explanation.grad_modifiers[1] has {LONG} characters", "use at most 256"],
    ),
    (
        "output dtype 99",
        "Explain",
        lambda: with_explanation(output_dtype=99),
        INVALID,
        ["explanation.output_dtype=<unknown dtype 99>", "'float32', 'float16', 'uint8'"],
    ),
    (
        "wrt index out of range",
        "Explain",
        lambda: explain(wrt=99),
        INVALID,
        ["explanation.wrt.index=99 is out of range", "(valid -3..2)"],
    ),
    (
        "unknown wrt layer",
        "Explain",
        lambda: explain(wrt="nope"),
        INVALID,
        ["explanation.wrt.name='nope' is not a layer", "'x', 'flatten', 'logits'"],
    ),
    (
        "wrt for SmoothGrad",
        "Explain",
        lambda: explain(method="smoothgrad", wrt="flatten"),
        INVALID,
        ["explanation.wrt is not supported by method 'smoothgrad'", "leave wrt unset"],
    ),
    (
        "penultimate layer for vanilla",
        "Explain",
        lambda: explain(penultimate_layer="flatten"),
        INVALID,
        ["explanation.penultimate_layer does not apply to method 'vanilla'", "leave it unset"],
    ),
    (
        "unknown penultimate layer",
        "Explain",
        lambda: explain(
            model="smooth", x=np.zeros((1, *SMOOTH_SHAPE)), method="gradcam", penultimate_layer="no"
        ),
        INVALID,
        ["explanation.penultimate_layer.name='no' is not a layer", "'conv', 'conv2'"],
    ),
    (
        "penultimate layer without spatial extent",
        "Explain",
        lambda: explain(
            model="smooth",
            x=np.zeros((1, *SMOOTH_SHAPE)),
            method="gradcam++",
            penultimate_layer="flatten",
        ),
        INVALID,
        ["penultimate_layer.name='flatten'", "no spatial extent", "choose one of 'conv', 'conv2'"],
    ),
    (
        "penultimate index out of range",
        "Explain",
        lambda: explain(
            model="smooth", x=np.zeros((1, *SMOOTH_SHAPE)), method="gradcam", penultimate_layer=40
        ),
        INVALID,
        ["explanation.penultimate_layer.index=40 is out of range", "(valid -6..5)"],
    ),
    (
        "NaN noise",
        "Explain",
        lambda: explain(method="smoothgrad", noise=float("nan")),
        INVALID,
        ["explanation.noise=nan is not allowed", "use a finite value >= 0"],
    ),
    (
        "infinite noise",
        "Explain",
        lambda: explain(method="smoothgrad", noise=float("inf")),
        INVALID,
        ["explanation.noise=inf is not allowed", "use a finite value >= 0"],
    ),
    (
        "noise beyond float32",
        "Explain",
        lambda: explain(method="smoothgrad", noise=1e308),
        INVALID,
        ["explanation.noise=1e+308 is not allowed", "at most 3.402823e+38"],
    ),
    (
        "infinite baseline",
        "Explain",
        lambda: explain(
            method="integrated-gradients", baseline=np.full(LINEAR_SHAPE, np.inf, np.float32)
        ),
        INVALID,
        ["explanation.baseline holds NaN or infinite values", "only finite values"],
    ),
    (
        "baseline of DataType 99",
        "Explain",
        lambda: edited(
            baseline(tensor(list(LINEAR_SHAPE), b"\0" * 360, dtype=99)),
            method="integrated-gradients",
        ),
        INVALID,
        ["explanation.baseline.dtype=<unknown dtype 99> is not supported", "float32"],
    ),
    (
        "baseline shorter than declared",
        "Explain",
        lambda: edited(
            baseline(tensor(list(LINEAR_SHAPE), b"\0" * 8)), method="integrated-gradients"
        ),
        INVALID,
        ["explanation.baseline.data has 8 bytes", "needs 360"],
    ),
    (
        "baseline shape product over int64",
        "Explain",
        lambda: edited(baseline(tensor([2**32, 2**32])), method="integrated-gradients"),
        INVALID,
        ["explanation.baseline.data has 0 bytes", f"needs {2**66}"],
    ),
    (
        "baseline with a negative dimension",
        "Explain",
        lambda: edited(baseline(tensor([6, -5, 3])), method="integrated-gradients"),
        INVALID,
        ["explanation.baseline.shape=[6, -5, 3] has a negative dimension"],
    ),
    # Bytes that are no request, and RPCs that do not exist.
    (
        "not a protobuf message",
        "Predict",
        lambda: b"\xff\xff\xff",
        INVALID,
        ["not a valid protobuf message", "'salience.v1.PredictRequest'"],
    ),
    (
        "truncated message",
        "Explain",
        cut_in_half,
        INVALID,
        ["not a valid protobuf message", "'salience.v1.ExplainRequest'"],
    ),
    (
        "invalid UTF-8 in a string",
        "GetModelMetadata",
        # GetModelMetadataRequest{model: ModelSpec{name: b"\xff"}}
        lambda: b"\x0a\x03\x0a\x01\xff",
        INVALID,
        ["not a valid protobuf message", "'salience.v1.GetModelMetadataRequest'", "UTF-8"],
    ),
    (
        "nesting too deep",
        "ListModels",
        # Unknown groups nested 200 deep: past protobuf's recursion limit of 100.
        lambda: b"\x0b" * 200 + b"\x0c" * 200,
        INVALID,
        ["not a valid protobuf message", "'salience.v1.ListModelsRequest'"],
    ),
    (
        "unknown RPC",
        "Translate",
        lambda: predict(good_x()).SerializeToString(),
        grpc.StatusCode.UNIMPLEMENTED,
        ["Method not found"],
    ),
    (
        "message over the size limit",
        "Predict",
        # ~29 MB > the server's 4 MiB.
        lambda: predict(np.zeros((MAX_BATCH, 6, 5, 3 * 10_000), np.float32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        [str(MAX_MESSAGE)],
    ),
]


def send(channel: grpc.Channel, rpc: str, request: Any) -> Any:
    if isinstance(request, bytes):
        return call_raw(channel, rpc, request)
    return getattr(salience_pb2_grpc.SalienceStub(channel), rpc)(request, timeout=30)


@pytest.mark.parametrize(
    ("rpc", "build", "code", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_precise_status_and_message(
    channel: grpc.Channel,
    linear: Linear,
    rpc: str,
    build: Callable[[], Any],
    code: grpc.StatusCode,
    fragments: list[str],
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(channel, rpc, build())
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    # ... and the server goes on serving everyone else, with the right values.
    check_still_serving(channel, linear)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def unknown_field(message: Any, field: int = 1000) -> bytes:
    """The message's bytes followed by a varint field (wire type 0) of a number the
    schema does not know, with the value 7.
    """
    return message.SerializeToString() + varint(field << 3) + varint(7)


def check_predicted(linear: Linear, x: np.ndarray, response: pb.PredictResponse) -> None:
    outputs = tensors.decode(response.outputs[0], "outputs[0]")
    np.testing.assert_allclose(outputs, linear.logits(x), rtol=1e-5, atol=1e-5)


def check_vanilla(linear: Linear, response: pb.ExplainResponse) -> None:
    """The map of `tolerated_explain`: the raw gradient of logit 2."""
    assert response.resolved.method == "vanilla"
    assert (response.resolved.samples, response.resolved.steps) == (0, 0)
    saliency = tensors.decode(response.maps[0].map, "maps[0]")
    for sample in saliency:
        np.testing.assert_allclose(sample, linear.gradient(2), rtol=1e-5, atol=1e-6)


def tolerated_explain(**options: Any) -> pb.ExplainRequest:
    return explain(
        filter_indices=[2], grad_modifiers=["none"], keepdims=True, normalize=False, **options
    )


# (id, RPC, request, check of the response)
Tolerated = tuple[str, str, Callable[[], Any], Callable[[Linear, bytes], None]]
TOLERATED: list[Tolerated] = [
    (
        "unknown field",
        "Predict",
        lambda: unknown_field(predict(good_x())),
        lambda linear, data: check_predicted(linear, good_x(), pb.PredictResponse.FromString(data)),
    ),
    (
        "known field with another wire type",
        "GetModelMetadata",
        # ModelSpec{name: "linear", version: <length-delimited "7">}: a field whose wire
        # type does not match the schema's is kept as an unknown field, so version is 0.
        lambda: b"\x0a\x0b\x0a\x06linear\x12\x017",
        lambda linear, data: _check_metadata(pb.ModelMetadata.FromString(data)),
    ),
    (
        "unknown field in ListModels",
        "ListModels",
        lambda: unknown_field(pb.ListModelsRequest()),
        lambda linear, data: _check_listed(pb.ListModelsResponse.FromString(data)),
    ),
    (
        "options of another method",
        "Explain",
        lambda: tolerated_explain(samples=5, steps=7, noise=0.3).SerializeToString(),
        lambda linear, data: check_vanilla(linear, pb.ExplainResponse.FromString(data)),
    ),
    (
        "seed for a deterministic method",
        "Explain",
        lambda: tolerated_explain(seed=2**64 - 1).SerializeToString(),
        lambda linear, data: check_vanilla(linear, pb.ExplainResponse.FromString(data)),
    ),
    (
        "empty method",
        "Explain",
        lambda: tolerated_explain(method="").SerializeToString(),
        lambda linear, data: check_vanilla(linear, pb.ExplainResponse.FromString(data)),
    ),
]


def _check_metadata(meta: pb.ModelMetadata) -> None:
    assert (meta.name, meta.version, list(meta.versions)) == ("linear", 1, [1])
    assert [(i.name, list(i.shape)) for i in meta.inputs] == [("x", [-1, *LINEAR_SHAPE])]


def _check_listed(listed: pb.ListModelsResponse) -> None:
    names = [m.name for m in listed.models]
    assert names == ["linear", "pair", "smooth", "softmax", "valid"]


@pytest.mark.parametrize(
    ("rpc", "build", "check"),
    [case[1:] for case in TOLERATED],
    ids=[case[0] for case in TOLERATED],
)
def test_tolerated_request_is_answered_correctly(
    channel: grpc.Channel,
    linear: Linear,
    rpc: str,
    build: Callable[[], Any],
    check: Callable[[Linear, bytes], None],
) -> None:
    request = build()
    data = request if isinstance(request, bytes) else request.SerializeToString()
    check(linear, call_raw(channel, rpc, data))
