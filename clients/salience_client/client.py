"""The blocking client: numpy arrays in, typed results with numpy arrays out.

    with SalienceClient("localhost:50051") as client:
        result = client.explain("shapes", images, filter_indices=[2])
        heatmaps = result.maps["absolute"]

From a production backend: TLS (mutual, with a client certificate), a bearer token,
client-side round robin over every replica a headless Service resolves to, and a
deadline of 2 s per call, retried on UNAVAILABLE and RESOURCE_EXHAUSTED:

    client = SalienceClient(
        "dns:///salience-headless.ml.svc:50051",
        tls=TLS.from_files(ca="ca.pem", cert="client.pem", key="client.key"),
        token=Path("/var/run/secrets/salience/token").read_text().strip(),
        timeout=2.0,
    )

`salience_client.aio.AsyncSalienceClient` has the same API for asyncio. The
channel's retries, keep-alive and load balancing are in `salience_client.channel`.
Imports grpcio, protobuf and numpy only — never TensorFlow.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience.v1 import salience_pb2_grpc
from salience_client import tensors
from salience_client.channel import (
    DEFAULT,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_SECONDS,
    TLS,
    ChannelConfig,
    Keepalive,
    RetryPolicy,
    Timeout,
    check_timeout,
    resolve_timeout,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT_SECONDS",
    "Explanation",
    "Inputs",
    "Objective",
    "Prediction",
    "ResolvedExplanation",
    "ResolvedObjective",
    "SalienceClient",
    "SalienceError",
    "explanation_request",
    "explanation_result",
    "predict_request",
    "prediction_result",
]

Inputs = np.ndarray | Mapping[str, np.ndarray]
"""One array for a single-input model, or arrays keyed by input name."""


class SalienceError(Exception):
    """The call failed: the server's status `code` and message `details`, or the
    client's own (UNAVAILABLE when no server answered, DEADLINE_EXCEEDED when the
    deadline passed — `details` then names the deadline in seconds).

    `timeout` is the deadline the call was sent with (None: it had none).
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, *, timeout: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.timeout = timeout

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, timeout: float | None) -> SalienceError:
        """The error a failed call raises."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = (err.details() if hasattr(err, "details") else None) or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            # gRPC's own text is "Deadline Exceeded": say which deadline it was.
            details = f"no answer within the call's deadline of {timeout:g} s ({details})"
        return cls(code, details, timeout=timeout)


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
class ResolvedObjective:
    """One objective as the server computed it.

    `reduction` is "units" (Dense-like: the units' values), "channel_mean"
    (Conv-like: each channel's spatial mean) or "layer_mean" (no filter index);
    `used_logits` says whether a softmax/sigmoid layer was scored on its logits.
    """

    layer_name: str
    layer_index: int
    filter_indices: tuple[int, ...]
    weight: float
    used_logits: bool
    reduction: str

    @classmethod
    def from_proto(cls, message: pb.ResolvedObjective) -> ResolvedObjective:
        return cls(
            layer_name=message.layer_name,
            layer_index=int(message.layer_index),
            filter_indices=tuple(int(i) for i in message.filter_indices),
            weight=float(message.weight),
            used_logits=bool(message.used_logits),
            reduction=message.reduction,
        )


@dataclass(frozen=True)
class ResolvedExplanation:
    """Exactly what was computed, every default filled in (the README's option table).

    `seed` is SmoothGrad's noise seed (drawn by the server when the request set
    none; None for methods without noise); `samples`/`noise` SmoothGrad's and
    `steps` Integrated Gradients' (0 for other methods); `wrt` and
    `penultimate_layer` are layer names ("" when unused); `channels_reduced` says
    whether a channel axis was reduced by its max.
    """

    method: str = ""
    objectives: tuple[ResolvedObjective, ...] = ()
    grad_modifiers: tuple[str, ...] = ()
    keepdims: bool = False
    normalize: bool = True
    output_dtype: str = "float32"
    input: str = ""
    channels_reduced: bool = False
    seed: int | None = None
    backprop_modifier: str = ""
    wrt: str = ""
    penultimate_layer: str = ""
    samples: int = 0
    noise: float = 0.0
    steps: int = 0
    output: str = ""
    # Sanity check: the re-initialised layers (output first) and their seed.
    randomized_layers: tuple[str, ...] = ()
    randomization_seed: int = 0
    # Blur IG's, Guided IG's and XRAI's own parameters (0 or () for other methods).
    blur_max_sigma: float = 0.0
    blur_grad_step: float = 0.0
    guided_fraction: float = 0.0
    guided_max_dist: float = 0.0
    xrai_scales: tuple[float, ...] = ()
    xrai_sigma: float = 0.0
    xrai_min_size: int = 0
    xrai_dilation_radius: int = 0
    xrai_area_threshold: float = 0.0

    @classmethod
    def from_proto(cls, message: pb.ResolvedExplanation) -> ResolvedExplanation:
        return cls(
            method=message.method,
            objectives=tuple(ResolvedObjective.from_proto(o) for o in message.objectives),
            grad_modifiers=tuple(message.grad_modifiers),
            keepdims=bool(message.keepdims),
            normalize=bool(message.normalize),
            output_dtype=tensors.dtype_name(message.output_dtype),
            input=message.input,
            channels_reduced=bool(message.channels_reduced),
            seed=int(message.seed) if message.HasField("seed") else None,
            backprop_modifier=message.backprop_modifier,
            wrt=message.wrt,
            penultimate_layer=message.penultimate_layer,
            samples=int(message.samples),
            noise=float(message.noise),
            steps=int(message.steps),
            output=message.output,
            randomized_layers=tuple(message.randomized_layers),
            randomization_seed=int(message.randomization_seed),
            blur_max_sigma=float(message.blur_max_sigma),
            blur_grad_step=float(message.blur_grad_step),
            guided_fraction=float(message.guided_fraction),
            guided_max_dist=float(message.guided_max_dist),
            xrai_scales=tuple(float(v) for v in message.xrai_scales),
            xrai_sigma=float(message.xrai_sigma),
            xrai_min_size=int(message.xrai_min_size),
            xrai_dilation_radius=int(message.xrai_dilation_radius),
            xrai_area_threshold=float(message.xrai_area_threshold),
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

    @property
    def predictions(self) -> np.ndarray:
        """The first (usually only) model output."""
        return next(iter(self.outputs.values()))


@dataclass(frozen=True)
class Explanation:
    """Predictions, one map per grad modifier (batch first), and what was computed."""

    outputs: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    model_version: int
    resolved: ResolvedExplanation = field(default_factory=ResolvedExplanation, repr=False)
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


def predict_request(model: str, inputs: Inputs, *, version: int = 0) -> pb.PredictRequest:
    """Builds a PredictRequest (version 0: the highest served)."""
    return pb.PredictRequest(
        model=pb.ModelSpec(name=model, version=version), inputs=_input_tensors(inputs)
    )


def prediction_result(response: pb.PredictResponse) -> Prediction:
    """The typed result of a PredictResponse."""
    return Prediction(
        outputs=_outputs(response.outputs),
        model_version=response.model.version,
        labels=list(response.labels),
    )


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
    randomize_layers: int = 0,
    randomize_seed: int = 0,
    blur_max_sigma: float | None = None,
    blur_grad_step: float | None = None,
    guided_fraction: float | None = None,
    guided_max_dist: float | None = None,
    xrai_scales: Sequence[float] = (),
    xrai_sigma: float | None = None,
    xrai_min_size: int | None = None,
    xrai_dilation_radius: int | None = None,
    xrai_area_threshold: float | None = None,
) -> pb.ExplainRequest:
    """Builds an ExplainRequest; `layer`/`filter_indices` is shorthand for one objective.

    Unset options take the server's documented defaults (see the README's option
    table), or those of the model's configuration: `samples`/`noise` are SmoothGrad's,
    `steps`/`baseline` Integrated Gradients', `penultimate_layer` the CAM methods';
    `normalize` None means true, `output_dtype` None float32. `randomize_layers` > 0
    explains a copy of the model with that many top weighted layers re-initialised
    (seeded by `randomize_seed`): the parameter-randomisation sanity check.
    `blur_*` are Blur IG's parameters, `guided_*` Guided IG's, `xrai_*` XRAI's
    segmentation (None or empty: the method's default; the README's option table).
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
    if randomize_layers:
        explanation.randomization.layers = randomize_layers
        explanation.randomization.seed = randomize_seed
    path_parameters = {
        "blur_max_sigma": blur_max_sigma,
        "blur_grad_step": blur_grad_step,
        "guided_fraction": guided_fraction,
        "guided_max_dist": guided_max_dist,
        "xrai_sigma": xrai_sigma,
        "xrai_min_size": xrai_min_size,
        "xrai_dilation_radius": xrai_dilation_radius,
        "xrai_area_threshold": xrai_area_threshold,
    }
    for name, value in path_parameters.items():
        if value is not None:
            setattr(explanation, name, value)
    explanation.xrai_scales.extend(float(v) for v in xrai_scales)
    return pb.ExplainRequest(
        model=pb.ModelSpec(name=model, version=version),
        inputs=_input_tensors(inputs),
        explanation=explanation,
    )


def explanation_result(response: pb.ExplainResponse) -> Explanation:
    """The typed result of an ExplainResponse."""
    return Explanation(
        outputs=_outputs(response.outputs),
        maps={
            m.grad_modifier: tensors.decode(m.map, f"maps[{i}]")
            for i, m in enumerate(response.maps)
        },
        model_version=response.model.version,
        resolved=ResolvedExplanation.from_proto(response.resolved),
        completeness_residual=tensors.decode(response.completeness_residual, "residual")
        if response.HasField("completeness_residual")
        else None,
        score_difference=tensors.decode(response.score_difference, "score_difference")
        if response.HasField("score_difference")
        else None,
        labels=list(response.labels),
    )


class ClientBase:
    """What the blocking and the asyncio client share: the channel's configuration,
    the default deadline and the metadata of every call (see `SalienceClient`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        tls: TLS | bool | None = None,
        token: str | None = None,
        allow_plaintext_token: bool = False,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        keepalive: Keepalive | None = DEFAULT_KEEPALIVE,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        channel: Any = None,
    ) -> None:
        self.target = target
        self.timeout = check_timeout(timeout)
        if tls is True:
            security: TLS | None = TLS()
        else:
            security = tls if isinstance(tls, TLS) else None
        self.config = ChannelConfig(
            target=target,
            tls=security,
            token=token,
            allow_plaintext_token=allow_plaintext_token,
            retry=retry,
            keepalive=keepalive,
            load_balancing=load_balancing,
            max_message_bytes=max_message_bytes,
            extra_options=tuple(options),
        )
        self._metadata = self.config.call_metadata()
        self._channel = channel if channel is not None else self._open()
        # The generated stub takes a blocking or an asyncio channel alike.
        self._stub = salience_pb2_grpc.SalienceStub(self._channel)

    def _open(self) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        # Never the token.
        return f"{type(self).__name__}({self.target!r}, tls={self.config.tls is not None})"

    def _call_kwargs(self, timeout: Timeout) -> dict[str, Any]:
        """`timeout` and `metadata` of a stub call, from a method's `timeout=`."""
        return {"timeout": resolve_timeout(timeout, self.timeout), "metadata": self._metadata}


class SalienceClient(ClientBase):
    """A blocking client, safe to share between threads.

    Every call has a deadline: the client's `timeout` (60 s by default; None: no
    deadline), or a method's own `timeout=` — seconds, None for no deadline at all,
    or `DEFAULT` (the default) for the client's. Calls that fail with UNAVAILABLE
    or RESOURCE_EXHAUSTED are retried inside that deadline (`retry`, None: never);
    every other failure raises SalienceError at once.

    `tls`: a `TLS` (or True for the system's trusted roots) to verify the server,
    with a client certificate for mutual TLS; `token` is sent as
    `authorization: Bearer <token>` with every call (refused over plaintext to
    another machine unless `allow_plaintext_token`). `load_balancing` is
    "round_robin" over every address the target resolves to, or "pick_first";
    `keepalive` the connection's pings. `options` are extra gRPC channel
    arguments; `channel` replaces the channel built from all of these (the token
    and the deadlines still apply).
    """

    def _open(self) -> grpc.Channel:
        return self.config.open()

    def __enter__(self) -> SalienceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: Timeout) -> Any:
        kwargs = self._call_kwargs(timeout)
        try:
            return method(request, **kwargs)
        except grpc.RpcError as err:
            raise SalienceError.from_rpc_error(err, kwargs["timeout"]) from None

    def predict(
        self, model: str, inputs: Inputs, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> Prediction:
        """The model's outputs for a batch (first axis) of inputs."""
        request = predict_request(model, inputs, version=version)
        return prediction_result(self._call(self._stub.Predict, request, timeout))

    def explain(
        self, model: str, inputs: Inputs, *, timeout: Timeout = DEFAULT, **options: Any
    ) -> Explanation:
        """Predictions and saliency maps; options as in `explanation_request`."""
        request = explanation_request(model, inputs, **options)
        return explanation_result(self._call(self._stub.Explain, request, timeout))

    def metadata(
        self, model: str, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> pb.ModelMetadata:
        """Versions, inputs, outputs, layers and supported options of one model."""
        request = pb.GetModelMetadataRequest(model=pb.ModelSpec(name=model, version=version))
        return self._call(self._stub.GetModelMetadata, request, timeout)

    def list_models(self, *, timeout: Timeout = DEFAULT) -> list[pb.ModelMetadata]:
        """Every served model with its versions, inputs and outputs."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    def explain_stream(
        self,
        model: str,
        frames: Iterable[tuple[Any, Any]],
        *,
        version: int = 0,
        window: int = 0,
        timeout: float | None = None,
        **options: Any,
    ) -> Generator[tuple[Any, Explanation], None, None]:
        """Explains (frame_id, frame) pairs over one ExplainStream; yields
        (frame_id, Explanation) in frame order. A frame is one sample without the
        batch axis; `timeout` bounds the whole stream (None, the default: no
        deadline). See `salience_client.stream`.
        """
        from salience_client import stream  # it builds on this module

        return stream.explain_stream(
            self._stub,
            model,
            frames,
            version=version,
            window=window,
            timeout=check_timeout(timeout),
            metadata=self._metadata,
            **options,
        )
