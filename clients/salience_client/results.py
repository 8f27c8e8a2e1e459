"""The typed results of the salience calls and the error a failed call raises.

`Prediction` and `Explanation` hold numpy arrays; `ResolvedExplanation` says
exactly what the server computed. Both clients and the stream return these, so they
live apart from either: `salience_client.messages` builds requests and reads
responses into them, `salience_client.client` and `.stream` only send and receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors

__all__ = [
    "Explanation",
    "Objective",
    "Prediction",
    "ResolvedExplanation",
    "ResolvedObjective",
    "SalienceError",
]


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
    # Score-CAM family and occlusion: rows per forward pass; Faster-ScoreCAM's kept
    # channels; occlusion's window, stride and value (0 for other methods).
    chunk_size: int = 0
    top_channels: int = 0
    window: int = 0
    stride: int = 0
    occlusion_value: float = 0.0
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
            chunk_size=int(message.chunk_size),
            top_channels=int(message.top_channels),
            window=int(message.window),
            stride=int(message.stride),
            occlusion_value=float(message.occlusion_value),
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
