"""Protocol-neutral explanation options and results.

The servicer converts protobuf into these types; the runtime and the methods only
ever see them. Names of methods and modifiers live here so that validation,
metadata and documentation agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from salience_server.errors import InvalidArgument

# The methods a request may name; `explain.methods.METHODS` implements each.
VANILLA = "vanilla"
GRADCAM = "gradcam"
GRADCAM_PLUS_PLUS = "gradcam++"
GUIDED_GRADCAM = "guided-gradcam"
SMOOTHGRAD = "smoothgrad"
INTEGRATED_GRADIENTS = "integrated-gradients"
GRADIENT_X_INPUT = "gradient-x-input"
SCORECAM = "scorecam"
FASTER_SCORECAM = "faster-scorecam"
LAYERCAM = "layercam"
OCCLUSION = "occlusion"
BLUR_IG = "blur-ig"
GUIDED_IG = "guided-ig"
XRAI = "xrai"
METHOD_NAMES: tuple[str, ...] = (
    VANILLA,
    GRADCAM,
    GRADCAM_PLUS_PLUS,
    GUIDED_GRADCAM,
    SMOOTHGRAD,
    INTEGRATED_GRADIENTS,
    GRADIENT_X_INPUT,
    SCORECAM,
    FASTER_SCORECAM,
    LAYERCAM,
    OCCLUSION,
    BLUR_IG,
    GUIDED_IG,
    XRAI,
)

DEFAULT_GRAD_MODIFIER = "absolute"

# Method defaults, documented in the README and the schema.
DEFAULT_SAMPLES = 16
DEFAULT_NOISE = 0.15
DEFAULT_STEPS = 64
# Score-CAM and occlusion: rows (copies x samples) of one batched forward pass, and
# its bound. Memory grows with the chunk, speed barely beyond a few dozen rows.
DEFAULT_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 1024
# Faster-ScoreCAM: the channels of highest spatial variance it keeps (tf-keras-vis's
# max_N); fewer when the CAM layer has fewer channels.
DEFAULT_TOP_CHANNELS = 10
# Occlusion: the side of the square (cube) window, in pixels of every spatial axis
# (clamped to the input's smallest spatial extent when unset and the model fixes
# that extent: free axes are only known when computed); the stride defaults to
# half the window (at least 1); the occluded pixels take the value 0 by default.
DEFAULT_WINDOW = 16
DEFAULT_OCCLUSION_VALUE = 0.0


def default_stride(window: int) -> int:
    """Occlusion's stride when the request sets none: half the window, at least 1."""
    return max(1, window // 2)


# The path methods' defaults and bounds (PAIR's saliency library's defaults, but
# the step count, which is the service's own for every path).
DEFAULT_BLUR_MAX_SIGMA = 50.0
MAX_BLUR_SIGMA = 1000.0
DEFAULT_BLUR_GRAD_STEP = 0.01
MAX_BLUR_GRAD_STEP = 1.0
DEFAULT_GUIDED_FRACTION = 0.25
DEFAULT_GUIDED_MAX_DIST = 0.02
DEFAULT_XRAI_SCALES = (50.0, 100.0, 150.0, 250.0, 500.0, 1200.0)
MAX_XRAI_SCALES = 16
MAX_XRAI_SCALE = 100000.0
DEFAULT_XRAI_SIGMA = 0.8
MAX_XRAI_SIGMA = 10.0
DEFAULT_XRAI_MIN_SIZE = 150
MAX_XRAI_MIN_SIZE = 224 * 224  # pixels of the image Felzenszwalb's algorithm segments
# Felzenszwalb's segments hold at least min_size of the 224x224 pixels each, so a
# request makes at most scales * 50176 / min_size regions: bounded by this, as every
# region is a mask of the image on the device.
MAX_XRAI_REGIONS = 4096
DEFAULT_XRAI_DILATION_RADIUS = 5
MAX_XRAI_DILATION_RADIUS = 32
DEFAULT_XRAI_AREA_THRESHOLD = 1.0


def in_range(
    field: str, value: float | None, default: float, low: float, high: float, low_open: bool
) -> float:
    """`value` (None: `default`) when `low < value <= high` (`low <= value` unless
    `low_open`), else InvalidArgument naming `explanation.<field>` and the range.
    """
    if value is None:
        return default
    above = value > low if low_open else value >= low
    if not (np.isfinite(value) and above and value <= high):
        sign = "<" if low_open else "<="
        raise InvalidArgument(
            f"explanation.{field}={value:g} is out of range: use {low:g} {sign} {field} <= "
            f"{high:g} (unset means {default:g})"
        )
    return float(value)


# Element type of returned maps, by the short names the wire codec uses.
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "uint8")


@dataclass(frozen=True)
class Limits:
    """Per-request caps from the server settings."""

    max_objectives: int = 16
    max_samples: int = 128
    max_steps: int = 512
    # Occlusion: most occluded copies (window positions) of one sample.
    max_windows: int = 4096
    # Per objective: each index is resolved and echoed one by one.
    max_filter_indices: int = 4096
    # The caps above that a model's configuration lowered (messages name their owner).
    model_caps: frozenset[str] = frozenset()

    def whose(self, cap: str) -> str:
        """Who set the cap named `cap`, for messages: "the model's" or "the server's"."""
        return "the model's" if cap in self.model_caps else "the server's"

    def check_filter_indices(self, k: int, count: int) -> None:
        """Refuses objective `k` listing `count` filter indices, over the cap."""
        if count > self.max_filter_indices:
            raise InvalidArgument(
                f"explanation.objectives[{k}].filter_indices has {count} entries, over the "
                f"server's max_filter_indices={self.max_filter_indices}: list each unit once, "
                "or none for the mean of the whole layer"
            )


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
    # Empty: the method's default ("absolute", or "none" for the CAM methods).
    grad_modifiers: tuple[str, ...] = ()
    keepdims: bool = False
    normalize: bool = True
    keep_activation: bool = False
    output_dtype: str = "float32"
    input_name: str = ""
    seed: int | None = None
    backprop_modifier: str = ""
    # A layer whose output the gradient is taken with respect to; None: the input.
    wrt: LayerSelector = None
    # The output head that objectives without a layer refer to; "": the first.
    output_name: str = ""
    # Grad-CAM family: None picks the last layer with spatial extent > 1x1.
    penultimate_layer: LayerSelector = None
    samples: int = 0  # 0: DEFAULT_SAMPLES
    noise: float | None = None  # None: DEFAULT_NOISE
    steps: int = 0  # 0: DEFAULT_STEPS
    baseline: np.ndarray | None = None  # one sample or one per sample; None: zeros
    # Score-CAM, Faster-ScoreCAM, occlusion: rows per batched forward pass (0: default).
    chunk_size: int = 0
    # Faster-ScoreCAM: channels kept (0: DEFAULT_TOP_CHANNELS).
    top_channels: int = 0
    # Occlusion: window side and stride in pixels (0: defaults), occluding value.
    window: int = 0
    stride: int = 0
    occlusion_value: float | None = None
    # Sanity check: explain a copy whose top `randomize_layers` weighted layers are
    # re-initialised with `randomize_seed` (0: the trained model).
    randomize_layers: int = 0
    randomize_seed: int = 0
    # The path methods' own parameters (`explain.methods.paths`); None or (): the
    # method's default.
    blur_max_sigma: float | None = None
    blur_grad_step: float | None = None
    guided_fraction: float | None = None
    guided_max_dist: float | None = None
    xrai_scales: tuple[float, ...] = ()
    xrai_sigma: float | None = None
    xrai_min_size: int | None = None
    xrai_dilation_radius: int | None = None
    xrai_area_threshold: float | None = None
    # The fields above the request left unset (their defaults were filled in), so a
    # model's configured defaults can take their place (model_config.ExplainDefaults).
    unset: frozenset[str] = frozenset()


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
    backprop_modifier: str = ""
    wrt: str = ""
    penultimate_layer: str = ""
    samples: int = 0
    noise: float = 0.0
    steps: int = 0
    output_name: str = ""
    # The re-initialised layers (output first) and their seed; () for the trained model.
    randomized_layers: tuple[str, ...] = ()
    randomization_seed: int = 0
    # Score-CAM family and occlusion: rows per forward pass; Faster-ScoreCAM's kept
    # channels; occlusion's window, stride and value (0 when the method has none).
    chunk_size: int = 0
    top_channels: int = 0
    window: int = 0
    stride: int = 0
    occlusion_value: float = 0.0
    # The path methods' own parameters as computed; 0 or () for the other methods.
    blur_max_sigma: float = 0.0
    blur_grad_step: float = 0.0
    guided_fraction: float = 0.0
    guided_max_dist: float = 0.0
    xrai_scales: tuple[float, ...] = ()
    xrai_sigma: float = 0.0
    xrai_min_size: int = 0
    xrai_dilation_radius: int = 0
    xrai_area_threshold: float = 0.0


@dataclass
class ExplainResult:
    """Predictions and one map per grad modifier, each stacked over the batch.

    `extras` holds per-sample method diagnostics (Integrated Gradients'
    `completeness_residual` and `score_difference`).
    """

    outputs: list[np.ndarray]
    maps: dict[str, np.ndarray]
    resolved: ResolvedExplanation
    extras: dict[str, np.ndarray] = field(default_factory=dict)
