"""What a planned explanation is, as data: the graph key, the per-request
post-processing and the plan (engine step 1's result).

No TensorFlow here: plans cross the device seam (`salience_server.seam`), and the
batcher and the protocol layer hold and compare them without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from salience_server.explain.options import ResolvedExplanation

# The per-sample param holding a request's count of copies (SmoothGrad's samples,
# Integrated Gradients' steps + 1 points; `methods.copies`): the cost model reads it.
COPIES = "copies"


@dataclass(frozen=True)
class Target:
    """A tensor of the explain graph that scores are read from."""

    layer_index: int
    used_logits: bool
    # Names of the layer inside the sub-model at `layer_index` (any depth); empty
    # for a top-level layer.
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Graph:
    """What shapes a compiled explanation function. Requests with equal graphs
    can share one device call; the runtime keeps one trace per graph.
    """

    method: str
    targets: tuple[Target, ...] = ()
    input_index: int = 0
    backprop_modifier: str = ""
    wrt: int | None = None  # layer index; None: the input
    penultimate: int | None = None  # layer index, CAM methods only
    samples: int = 0
    steps: int = 0
    # Method-specific static options that change the graph (hashable).
    extra: tuple[Any, ...] = ()
    # (layers, seed) of a randomised copy of the model to explain instead (sanity
    # check); None: the trained model. The runtime builds the function on that copy.
    randomize: tuple[int, int] | None = None


@dataclass(frozen=True)
class Post:
    """Per-request post-processing; may differ between requests in one batch."""

    grad_modifiers: tuple[str, ...]
    keepdims: bool
    normalize: bool
    output_dtype: str


@dataclass
class Plan:
    """One request, ready to be computed alone or inside a batch."""

    graph: Graph
    params: dict[str, np.ndarray]  # per-sample, batch-first
    post: Post
    resolved: ResolvedExplanation
    batch: int
    # What else must be equal for requests to share a device call: values the graph
    # takes as tensors but that set how much work a call does (SmoothGrad's samples,
    # Integrated Gradients' steps), so a call never runs to another request's count.
    share: tuple[Any, ...] = ()
    # Model passes per row when they are not a count of copies (`COPIES`): Score-CAM's
    # masked copies, occlusion's windows, each plus the unmasked pass. 0: from the
    # copies, else 1. The cost model (`cost`) admits and schedules by it.
    evaluations: int = 0
