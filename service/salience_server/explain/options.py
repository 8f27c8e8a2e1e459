"""Protocol-neutral explanation options and results.

The servicer converts protobuf into these types; the runtime and the methods only
ever see them. Names of methods and modifiers live here so that validation,
metadata and documentation agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The methods a request may name. Only VANILLA is computed today; the others are
# reserved names that are answered UNIMPLEMENTED rather than INVALID_ARGUMENT.
VANILLA = "vanilla"
IMPLEMENTED_METHODS: tuple[str, ...] = (VANILLA,)
RESERVED_METHODS: tuple[str, ...] = (
    "gradcam",
    "gradcam++",
    "guided-gradcam",
    "smoothgrad",
    "integrated-gradients",
    "gradient-x-input",
)
RESERVED_BACKPROP_MODIFIERS: tuple[str, ...] = ("guided", "rectified", "deconv", "relu")

DEFAULT_GRAD_MODIFIER = "absolute"
# Element type of returned maps, by the short names the wire codec uses.
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "uint8")

LayerSelector = str | int | None
"""A layer by name, by index (negative counts from the end), or None for the output."""


@dataclass(frozen=True)
class Objective:
    """One weighted term of the explained score."""

    layer: LayerSelector = None
    filter_indices: tuple[int, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True)
class ExplainOptions:
    """An explanation request with every default filled in, not yet checked
    against a model (the runtime does that, since it knows the layers).
    """

    method: str = VANILLA
    objectives: tuple[Objective, ...] = (Objective(),)
    grad_modifiers: tuple[str, ...] = (DEFAULT_GRAD_MODIFIER,)
    keepdims: bool = False
    normalize: bool = True
    keep_activation: bool = False
    output_dtype: str = "float32"
    input_name: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class ResolvedObjective:
    """An objective as computed: the layer it resolved to and how it was reduced."""

    layer_name: str
    layer_index: int
    filter_indices: tuple[int, ...]
    weight: float
    used_logits: bool
    reduction: str  # "units", "channel_mean" or "layer_mean"


@dataclass(frozen=True)
class ResolvedExplanation:
    """Exactly what was computed, echoed to the caller."""

    method: str
    objectives: tuple[ResolvedObjective, ...]
    grad_modifiers: tuple[str, ...]
    keepdims: bool
    normalize: bool
    output_dtype: str
    input_name: str
    channels_reduced: bool
    seed: int | None


@dataclass
class ExplainResult:
    """Predictions and one map per grad modifier, each stacked over the batch."""

    outputs: list[np.ndarray]
    maps: dict[str, np.ndarray]
    resolved: ResolvedExplanation
