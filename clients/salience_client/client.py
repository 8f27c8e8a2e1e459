"""The synchronous client: numpy arrays in, numpy arrays out.

    with SalienceClient("localhost:50051") as client:
        result = client.explain("shapes", images, filter_indices=[2])
        heatmaps = result.maps["absolute"]

Imports grpcio, protobuf and numpy only — never TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors

DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Inputs = np.ndarray | Mapping[str, np.ndarray]
"""One array for a single-input model, or arrays keyed by input name."""


class SalienceError(Exception):
    """The server answered with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Objective:
    """A weighted term of the explained score (see the README's option table).

    `layer` is a layer name, an index (negative counts from the end) or None for
    the output layer; no filter index means the mean of the whole layer output.
    """

    layer: str | int | None = None
    filter_indices: Sequence[int] = ()
    weight: float = 1.0

    def to_proto(self) -> pb.Objective:
        ref = pb.LayerRef()
        if isinstance(self.layer, str):
            ref.name = self.layer
        elif self.layer is not None:
            ref.index = int(self.layer)
        return pb.Objective(
            layer=ref, filter_indices=[int(i) for i in self.filter_indices], weight=self.weight
        )


@dataclass(frozen=True)
class Prediction:
    """The model's outputs by output name, and the version that computed them.

    `labels`: per sample, the name of its predicted class, when the model's
    configuration names its classes (else empty).
    """

    outputs: dict[str, np.ndarray]
    model_version: int
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Explanation:
    """Predictions, one map per grad modifier (batch first), and what was computed."""

    outputs: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    model_version: int
    resolved: pb.ResolvedExplanation = field(repr=False)
    # Integrated Gradients only, per sample: sum(attributions) - (s(x) - s(x')),
    # and s(x) - s(x'). None for the other methods.
    completeness_residual: np.ndarray | None = None
    score_difference: np.ndarray | None = None
    # Per sample, the name of its predicted class when the model names its classes.
    labels: list[str] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        """The first (usually only) model output."""
        return next(iter(self.outputs.values()))


def _layer_ref(layer: str | int) -> pb.LayerRef:
    return pb.LayerRef(name=layer) if isinstance(layer, str) else pb.LayerRef(index=int(layer))


def _input_tensors(inputs: Inputs) -> list[pb.Tensor]:
    if isinstance(inputs, Mapping):
        return [tensors.encode(np.asarray(a), name) for name, a in inputs.items()]
    return [tensors.encode(np.asarray(inputs))]


def _outputs(message: Sequence[pb.Tensor]) -> dict[str, np.ndarray]:
    return {
        t.name or f"output_{i}": tensors.decode(t, f"outputs[{i}]") for i, t in enumerate(message)
    }


def explanation_request(
    model: str,
    inputs: Inputs,
    *,
    version: int = 0,
    method: str = "",
    layer: str | int | None = None,
    filter_indices: Sequence[int] = (),
    objectives: Sequence[Objective] = (),
    grad_modifiers: Sequence[str] = (),
    keepdims: bool = False,
    normalize: bool | None = None,
    keep_activation: bool = False,
    output_dtype: str | None = None,
    input_name: str = "",
    seed: int | None = None,
    backprop_modifier: str = "",
    wrt: str | int | None = None,
    output: str = "",
    penultimate_layer: str | int | None = None,
    samples: int = 0,
    noise: float | None = None,
    steps: int = 0,
    baseline: np.ndarray | None = None,
) -> pb.ExplainRequest:
    """Builds an ExplainRequest; `layer`/`filter_indices` is shorthand for one objective.

    Unset options take the server's documented defaults (see the README's option
    table), or those of the model's configuration: `samples`/`noise` are SmoothGrad's,
    `steps`/`baseline` Integrated Gradients', `penultimate_layer` the CAM methods';
    `normalize` None means true, `output_dtype` None float32.
    """
    if objectives and (layer is not None or filter_indices):
        raise ValueError("give either objectives or layer/filter_indices, not both")
    if output_dtype is not None and output_dtype not in tensors.DTYPES_BY_NAME:
        raise ValueError(f"output_dtype={output_dtype!r} is unknown: use float32, float16 or uint8")
    chosen = list(objectives)
    if not chosen and (layer is not None or filter_indices):
        chosen = [Objective(layer, tuple(filter_indices))]
    explanation = pb.Explanation(
        method=method,
        objectives=[o.to_proto() for o in chosen],
        grad_modifiers=list(grad_modifiers),
        keepdims=keepdims,
        keep_activation=keep_activation,
        output_dtype=tensors.DTYPES_BY_NAME[output_dtype] if output_dtype else None,
        input=input_name,
        backprop_modifier=backprop_modifier,
        output=output,
        samples=samples,
        steps=steps,
    )
    if normalize is not None:
        explanation.normalize = normalize
    if seed is not None:
        explanation.seed = seed
    if noise is not None:
        explanation.noise = noise
    if wrt is not None:
        explanation.wrt.CopyFrom(_layer_ref(wrt))
    if penultimate_layer is not None:
        explanation.penultimate_layer.CopyFrom(_layer_ref(penultimate_layer))
    if baseline is not None:
        explanation.baseline.CopyFrom(tensors.encode(np.asarray(baseline)))
    return pb.ExplainRequest(
        model=pb.ModelSpec(name=model, version=version),
        inputs=_input_tensors(inputs),
        explanation=explanation,
    )


def explanation_result(response: pb.ExplainResponse) -> Explanation:
    return Explanation(
        outputs=_outputs(response.outputs),
        maps={
            m.grad_modifier: tensors.decode(m.map, f"maps[{i}]")
            for i, m in enumerate(response.maps)
        },
        model_version=response.model.version,
        resolved=response.resolved,
        completeness_residual=tensors.decode(response.completeness_residual, "residual")
        if response.HasField("completeness_residual")
        else None,
        score_difference=tensors.decode(response.score_difference, "score_difference")
        if response.HasField("score_difference")
        else None,
        labels=list(response.labels),
    )


class SalienceClient:
    """A blocking client with a default deadline on every call.

    Errors are raised as SalienceError with the server's status code and message.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = salience_pb2_grpc.SalienceStub(self._channel)

    def __enter__(self) -> SalienceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise SalienceError(err.code(), err.details() or "") from None

    def predict(
        self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None
    ) -> Prediction:
        """The model's outputs for a batch (first axis) of inputs."""
        request = pb.PredictRequest(
            model=pb.ModelSpec(name=model, version=version), inputs=_input_tensors(inputs)
        )
        response = self._call(self._stub.Predict, request, timeout)
        return Prediction(
            outputs=_outputs(response.outputs),
            model_version=response.model.version,
            labels=list(response.labels),
        )

    def explain(
        self, model: str, inputs: Inputs, *, timeout: float | None = None, **options: Any
    ) -> Explanation:
        """Predictions and saliency maps; options as in `explanation_request`."""
        request = explanation_request(model, inputs, **options)
        return explanation_result(self._call(self._stub.Explain, request, timeout))

    def metadata(
        self, model: str, *, version: int = 0, timeout: float | None = None
    ) -> pb.ModelMetadata:
        """Versions, inputs, outputs, layers and supported options of one model."""
        request = pb.GetModelMetadataRequest(model=pb.ModelSpec(name=model, version=version))
        return self._call(self._stub.GetModelMetadata, request, timeout)

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelMetadata]:
        """Every served model with its versions, inputs and outputs."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)
