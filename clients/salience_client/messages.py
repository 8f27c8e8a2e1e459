"""Requests from numpy arrays and options, typed results from responses.

The blocking client, the asyncio client, the stream and the load generator all
build their messages here, so an option means the same wherever it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from salience.v1 import salience_pb2 as pb
from salience_client import tensors
from salience_client.results import (
    Explanation,
    Objective,
    Prediction,
    ResolvedExplanation,
)

__all__ = [
    "Inputs",
    "explanation_request",
    "explanation_result",
    "predict_request",
    "prediction_result",
]

Inputs = np.ndarray | Mapping[str, np.ndarray]
"""One array for a single-input model, or arrays keyed by input name."""


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
    chunk_size: int = 0,
    top_channels: int = 0,
    window: int = 0,
    stride: int = 0,
    occlusion_value: float | None = None,
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
    `chunk_size` is the rows per forward pass of Score-CAM, Faster-ScoreCAM and
    occlusion (0: 64), `top_channels` Faster-ScoreCAM's kept channels (0: 10),
    `window`/`stride`/`occlusion_value` occlusion's (0: 16, half the window; None: 0).
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
        chunk_size=chunk_size,
        top_channels=top_channels,
        window=window,
        stride=stride,
    )
    if occlusion_value is not None:
        explanation.occlusion_value = occlusion_value
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
