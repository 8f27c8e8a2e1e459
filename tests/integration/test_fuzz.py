"""Property-based fuzzing of a real server with random and mutated requests.

Hypothesis mutates valid Predict, Explain and GetModelMetadata requests (random
models, versions, dtypes, shapes, bytes, names, every explanation option and their
combinations) and flips, inserts and deletes bytes of serialised ones, sent raw to
every RPC. Every call carries a deadline. The properties:

- no call fails with INTERNAL, UNKNOWN, or a status other than the documented
  refusals (docs/bad-input.md), and none runs into its deadline;
- a request the server answers for `linear` gets the model's exact outputs;
- a valid Predict and Explain sent every few examples, and once at the end, get
  their closed-form values.

The run is reproducible: examples are derived from the test itself
(`derandomize`), unless `SALIENCE_FUZZ_SEED` picks a seed. Its size is
`SALIENCE_FUZZ_EXAMPLES` (default 1000, about 15 s on two cores); a long
run: `SALIENCE_FUZZ_EXAMPLES=100000 .venv/bin/pytest -q tests/integration/test_fuzz.py`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from tests.integration.bad_requests import (
    PAIR_SHAPES,
    Linear,
    build_bad_input_repository,
    call_raw,
    check_still_serving,
    good_x,
    wire_dtype,
)
from tests.integration.models import LINEAR_SHAPE, SMOOTH_SHAPE

EXAMPLES = int(os.environ.get("SALIENCE_FUZZ_EXAMPLES", "1000"))
SEED = os.environ.get("SALIENCE_FUZZ_SEED")
CANARY_EVERY = 25  # examples between two valid requests whose values are checked
DEADLINE_SECONDS = 30.0

# Every status a request can get (docs/bad-input.md); anything else fails the run.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
RPCS = ["Predict", "Explain", "GetModelMetadata", "ListModels"]

MODELS = ["linear", "softmax", "smooth", "pair", "valid"]
# Longer than a status message may be: an echo of it would not reach the caller.
LONG_NAME = "n" * 20_000
NAMES = [*MODELS, "", "nope", "../shapes", "a/b", "\x00", ".", "..", "m" * 129, LONG_NAME]
LAYERS = ["x", "flatten", "logits", "probs", "conv", "conv2", "hidden", "out", "gap", "", LONG_NAME]
METHODS = [
    "vanilla",
    "gradcam",
    "gradcam++",
    "guided-gradcam",
    "smoothgrad",
    "integrated-gradients",
    "gradient-x-input",
    "scorecam",
    "faster-scorecam",
    "layercam",
    "occlusion",
    "",
    "lime",
    LONG_NAME,
]
MODIFIERS = ["absolute", "none", "negate", "relu", "invert", "small_values", "sqrt", LONG_NAME]
BACKPROP = ["", "guided", "rectified", "deconv", "relu", LONG_NAME]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, 3.5e38, 1e308, np.nan, np.inf, -np.inf]
# What a float32 input may hold besides ordinary values.
SPECIAL_FLOAT32 = [-0.0, 1e-45, 3.4e38, -3.4e38, np.nan, np.inf, -np.inf]

int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
doubles = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats())
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))


def one_in(n: int) -> st.SearchStrategy[bool]:
    return st.integers(0, n - 1).map(lambda k: k == 0)


@st.composite
def shapes(draw: st.DrawFn) -> list[int]:
    return draw(
        st.one_of(
            st.lists(st.integers(0, 9), max_size=6),
            # Products that overflow int64 or numpy, with or without a zero-sized axis.
            st.lists(st.sampled_from([0, 1, 3, -1, 2**31, 2**32, 2**40, 2**62]), max_size=6),
            st.lists(int64s, max_size=4),
            st.lists(st.just(1), min_size=30, max_size=100),
        )
    )


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, extended, with bytes flipped, or replaced outright."""
    kind = draw(st.sampled_from(["empty", "truncate", "extend", "flip", "replace"]))
    if kind == "empty":
        return b""
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    return draw(st.binary(max_size=64))


@st.composite
def mutated(draw: st.DrawFn, valid: pb.Tensor) -> pb.Tensor:
    """A copy of a valid tensor with some of dtype, shape, bytes, name, values broken."""
    t = pb.Tensor()
    t.CopyFrom(valid)
    if draw(one_in(4)) and t.dtype == pb.DATA_TYPE_FLOAT32 and t.data:
        values = np.frombuffer(t.data, np.float32).copy()
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(SPECIAL_FLOAT32))
        t.data = values.tobytes()
    if draw(one_in(3)):
        t.dtype = wire_dtype(draw(st.one_of(st.integers(0, 8), st.sampled_from([99, -1]), int32s)))
    if draw(one_in(3)):
        del t.shape[:]
        t.shape.extend(draw(shapes()))
        if draw(st.booleans()):
            # The bytes a sender computing in int64 would send: its product wraps.
            claimed = math.prod(t.shape) * 4 % 2**64
            t.data = b"\0" * claimed if claimed <= 4096 else b""
    if draw(one_in(3)):
        t.data = draw(byte_mutations(t.data))
    if draw(one_in(5)):
        t.name = draw(names)
    return t


@st.composite
def model_inputs(draw: st.DrawFn, model: str) -> list[pb.Tensor]:
    """Valid inputs of `model` (batch 1 to 3), then perhaps mutated or shuffled."""
    n = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if model == "pair":
        valid = [
            tensors.encode(rng.uniform(-1, 1, (n, *shape)).astype(np.float32), name)
            for name, shape in PAIR_SHAPES.items()
        ]
    elif model == "smooth":
        valid = [tensors.encode(rng.uniform(-1, 1, (n, *SMOOTH_SHAPE)))]
    elif model == "valid":
        size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)), 3)
        valid = [tensors.encode(rng.uniform(-1, 1, (n, *size)).astype(np.float32))]
    else:
        valid = [tensors.encode(rng.uniform(-1, 1, (n, *LINEAR_SHAPE)).astype(np.float32))]
    inputs = [draw(mutated(t)) if draw(one_in(3)) else t for t in valid]
    if draw(one_in(8)):
        inputs = draw(st.permutations(inputs + inputs[: draw(st.integers(0, 1))]))
    if draw(one_in(12)):
        inputs = []
    return inputs


@st.composite
def model_specs(draw: st.DrawFn, model: str) -> pb.ModelSpec:
    name = draw(names) if draw(one_in(6)) else model
    version = draw(st.one_of(st.sampled_from([1, 2, -1]), int64s)) if draw(one_in(6)) else 0
    return pb.ModelSpec(name=name, version=version)


@st.composite
def layer_refs(draw: st.DrawFn) -> pb.LayerRef:
    if draw(st.booleans()):
        return pb.LayerRef(name=draw(st.one_of(st.sampled_from(LAYERS), st.text(max_size=8))))
    return pb.LayerRef(index=draw(st.one_of(st.integers(-8, 8), int32s)))


@st.composite
def objectives(draw: st.DrawFn) -> pb.Objective:
    objective = pb.Objective(
        filter_indices=draw(
            st.lists(st.one_of(st.integers(-2, 6), int64s), max_size=draw(st.sampled_from([3, 20])))
        )
    )
    if draw(st.booleans()):
        objective.layer.CopyFrom(draw(layer_refs()))
    if draw(st.booleans()):
        objective.weight = draw(doubles)
    return objective


@st.composite
def explanations(draw: st.DrawFn) -> pb.Explanation:
    """Random values of every option, each left unset half of the time."""
    e = pb.Explanation()

    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(strategy) if draw(st.booleans()) else None

    if (method := maybe(st.one_of(st.sampled_from(METHODS), st.text(max_size=8)))) is not None:
        e.method = method
    e.objectives.extend(maybe(st.lists(objectives(), max_size=5)) or [])
    e.grad_modifiers.extend(maybe(st.lists(st.sampled_from(MODIFIERS), max_size=8)) or [])
    e.keepdims = draw(st.booleans())
    if (normalize := maybe(st.booleans())) is not None:
        e.normalize = normalize
    e.keep_activation = draw(st.booleans())
    dtype = maybe(st.one_of(st.integers(0, 8), st.sampled_from([99]), int32s))
    e.output_dtype = wire_dtype(dtype or 0)
    e.backprop_modifier = maybe(st.sampled_from(BACKPROP)) or ""
    if draw(one_in(4)):
        e.wrt.CopyFrom(draw(layer_refs()))
    if (chosen_seed := maybe(st.integers(0, 2**64 - 1))) is not None:
        e.seed = chosen_seed
    e.input = maybe(st.sampled_from(["x", "a", "b", "image", "y", LONG_NAME])) or ""
    e.output = maybe(st.sampled_from(["logits", "probs", "out", LONG_NAME])) or ""
    if draw(one_in(4)):
        e.penultimate_layer.CopyFrom(draw(layer_refs()))
    e.samples = maybe(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))) or 0
    if (noise := maybe(doubles)) is not None:
        e.noise = noise
    e.steps = maybe(st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1))) or 0
    counts = st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1))
    e.chunk_size = maybe(st.one_of(st.integers(0, 2000), st.integers(0, 2**32 - 1))) or 0
    e.top_channels = maybe(counts) or 0
    e.window = maybe(counts) or 0
    e.stride = maybe(counts) or 0
    if (value := maybe(doubles)) is not None:
        e.occlusion_value = value
    if draw(one_in(4)):
        x = np.zeros(draw(st.sampled_from([LINEAR_SHAPE, (2, *LINEAR_SHAPE), (2, 2)])))
        e.baseline.CopyFrom(draw(mutated(tensors.encode(x.astype(np.float32)))))
    return e


@st.composite
def explain_requests(draw: st.DrawFn) -> tuple[str, Any]:
    model = draw(st.sampled_from(MODELS))
    request = pb.ExplainRequest(
        model=draw(model_specs(model)),
        inputs=draw(model_inputs(model)),
        explanation=draw(explanations()),
    )
    return "Explain", request


@st.composite
def predict_requests(draw: st.DrawFn) -> tuple[str, Any]:
    model = draw(st.sampled_from(MODELS))
    request = pb.PredictRequest(model=draw(model_specs(model)), inputs=draw(model_inputs(model)))
    return "Predict", request


@st.composite
def metadata_requests(draw: st.DrawFn) -> tuple[str, Any]:
    spec = draw(model_specs(draw(st.sampled_from(MODELS))))
    return "GetModelMetadata", pb.GetModelMetadataRequest(model=spec)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, Any]:
    """A serialised request with bytes flipped, inserted or deleted, sent to any RPC."""
    _, message = draw(st.one_of(explain_requests(), predict_requests(), metadata_requests()))
    data = message.SerializeToString()
    for _ in range(draw(st.integers(1, 3))):
        data = draw(byte_mutations(data))
    return draw(st.sampled_from(RPCS)), data


requests = st.one_of(explain_requests(), predict_requests(), metadata_requests(), raw_requests())


def send(
    stub: Any, channel: grpc.Channel, rpc: str, request: Any
) -> tuple[Any, grpc.RpcError | None]:
    """The response, or the error the call ended with."""
    try:
        if isinstance(request, bytes):
            return call_raw(channel, rpc, request, timeout=DEADLINE_SECONDS), None
        return getattr(stub, rpc)(request, timeout=DEADLINE_SECONDS), None
    except grpc.RpcError as err:
        return None, err


def check_answer(linear: Linear, rpc: str, request: Any, response: Any) -> None:
    """An answer for `linear` holds the model's exact outputs for the inputs sent."""
    if isinstance(request, bytes) or rpc not in {"Predict", "Explain"}:
        return
    if response.model.name != "linear":
        return
    x = tensors.decode(request.inputs[0], "inputs[0]")
    outputs = tensors.decode(response.outputs[0], "outputs[0]")
    np.testing.assert_allclose(outputs, linear.logits(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bad_input_repository(tmp_path_factory.mktemp("fuzz-repo"))


@pytest.fixture(scope="module")
def channel(repo: Path, server_factory: Any) -> grpc.Channel:
    # Small caps, so that random counts hit them and valid ones stay cheap.
    running = server_factory(
        repo,
        max_batch_size=4,
        max_message_bytes=4 * 1024 * 1024,
        max_objectives=4,
        max_filter_indices=16,
        max_samples=4,
        max_steps=8,
    )
    return grpc.insecure_channel(running.target)


def test_random_and_mutated_requests_never_break_the_server(
    channel: grpc.Channel, repo: Path
) -> None:
    linear = Linear.load(repo)
    stub = salience_pb2_grpc.SalienceStub(channel)
    codes: Counter[grpc.StatusCode] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=requests)
    def one(case: tuple[str, Any]) -> None:
        rpc, request = case
        response, err = send(stub, channel, rpc, request)
        if err is not None:
            assert err.code() in REFUSALS, f"{rpc}: {err.code()} {err.details()}"
            assert err.details(), f"{rpc}: {err.code()} without a message"
            codes[err.code()] += 1
        else:
            codes[grpc.StatusCode.OK] += 1
            check_answer(linear, rpc, request, response)
        if sum(codes.values()) % CANARY_EVERY == 0:
            check_still_serving(channel, linear, seed=sum(codes.values()))

    run: Callable[[], None] = one if SEED is None else seed(int(SEED))(one)
    run()
    check_still_serving(channel, linear, seed=1)
    # The run exercised both sides: requests answered and requests refused.
    assert codes[grpc.StatusCode.OK] > 0, codes
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0, codes
    print(
        f"fuzz: {sum(codes.values())} calls, "
        + ", ".join(f"{c.name}: {n}" for c, n in codes.items())
    )


def test_canary_values_are_checked(channel: grpc.Channel, repo: Path) -> None:
    # The canary itself would notice a wrong answer: a linear model with other weights.
    other = Linear.load(repo)
    wrong = Linear(other.kernel + 1e-3, other.bias)
    with pytest.raises(AssertionError):
        check_still_serving(channel, wrong)
    assert good_x().shape == (2, *LINEAR_SHAPE)
