"""What a request will make the device do, estimated before it is admitted.

The unit is the *element-evaluation*: one input element through one forward (or
forward and backward) pass of the model. A request's cost is

    cost = rows × evaluations × elements

- `rows`: its batch (first axis);
- `evaluations`: the model passes each row needs: 1 for a Predict and for the
  single-gradient methods (vanilla, gradient × input, Grad-CAM and Layer-CAM), the number
  of noisy copies for SmoothGrad (`samples`), the points of the path for
  Integrated Gradients (`steps + 1`) and the other path methods (their `steps`),
  the scored channels plus one for Score-CAM and Faster-ScoreCAM, the window
  positions plus one for occlusion (inputs with fixed spatial axes). Objectives
  are summed into one score, so they share one backward pass, and a randomised
  copy of the model replaces the model rather than adding to it: neither
  multiplies the cost;
- `elements`: the elements of one row of all its inputs, as sent.

Its maps' bytes are `rows × elements of the explained input × grad modifiers ×
bytes per element of output_dtype` (an upper bound: a map whose channels are
reduced is smaller).

Both are checked against per-request caps (INVALID_ARGUMENT, with how to fit under
them), and the cost is what the batcher's queue, lanes and device calls are
measured in (`batching`). Pure numpy and data: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from salience_server.errors import InvalidArgument
from salience_server.explain.options import (
    BLUR_IG,
    FASTER_SCORECAM,
    GUIDED_IG,
    INTEGRATED_GRADIENTS,
    OCCLUSION,
    SCORECAM,
    XRAI,
)
from salience_server.explain.plan import COPIES, Plan

# Path methods whose passes per row are their `steps` (XRAI's times its baselines).
PATH_METHODS = frozenset({BLUR_IG, GUIDED_IG, XRAI})
# How to ask for fewer passes where they are not a count the request gives.
FEWER_PASSES = {
    SCORECAM: "faster-scorecam with fewer top_channels",
    FASTER_SCORECAM: "fewer top_channels",
    OCCLUSION: "a larger window or stride",
}

# Bytes per element of each map dtype (output_dtype).
MAP_ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1}


@dataclass(frozen=True)
class CostLimits:
    """The per-request caps in cost and map bytes, the server's lowered by the model's."""

    max_request_cost: int
    max_map_bytes: int
    # The caps above that a model's configuration lowered (messages name their owner).
    model_caps: frozenset[str] = frozenset()

    def whose(self, cap: str) -> str:
        return "the model's" if cap in self.model_caps else "the server's"


@dataclass(frozen=True)
class Cost:
    """A request's estimated work and the terms it was computed from."""

    rows: int
    evaluations: int
    elements: int  # per row, all inputs
    map_bytes: int = 0

    @property
    def total(self) -> int:
        return self.rows * self.evaluations * self.elements

    @property
    def per_row(self) -> int:
        return self.evaluations * self.elements


def _row_elements(inputs: Sequence[np.ndarray]) -> int:
    return sum(math.prod(a.shape[1:]) for a in inputs)


def predict_cost(inputs: Sequence[np.ndarray]) -> Cost:
    """A Predict: one forward pass per row."""
    return Cost(len(inputs[0]), 1, max(1, _row_elements(inputs)))


def evaluations(plan: Plan) -> int:
    """Model passes per row of a planned explanation: what the plan states, else its
    count of copies, else 1.
    """
    if plan.evaluations:
        return plan.evaluations
    copies = plan.params.get(COPIES)
    return max(1, int(np.max(copies))) if copies is not None and copies.size else 1


def explain_cost(inputs: Sequence[np.ndarray], plan: Plan) -> Cost:
    """A planned explanation: its passes per row and the bytes of its maps."""
    rows = len(inputs[0])
    explained = inputs[min(plan.graph.input_index, len(inputs) - 1)]
    map_elements = rows * math.prod(explained.shape[1:])
    itemsize = MAP_ITEMSIZE.get(plan.post.output_dtype, 4)
    maps = max(1, len(plan.post.grad_modifiers))
    return Cost(
        rows, evaluations(plan), max(1, _row_elements(inputs)), map_elements * maps * itemsize
    )


def check(cost: Cost, limits: CostLimits, what: str) -> None:
    """Refuses a request over a cap with INVALID_ARGUMENT naming it and how to fit.

    `what` names the request's kind in the message ("Predict", "smoothgrad").
    """
    cap = limits.max_request_cost
    if cost.total > cap:
        passes = "" if cost.evaluations == 1 else f" × {cost.evaluations} evaluations"
        hints = []
        if cost.evaluations > 1:
            fit = cap // (cost.rows * cost.elements)
            if what in FEWER_PASSES:
                hints.append(FEWER_PASSES[what])
            else:
                count, most = (
                    ("steps", fit - 1) if what == INTEGRATED_GRADIENTS else
                    ("steps", fit) if what in PATH_METHODS else ("samples", fit)
                )  # fmt: skip
                room = f" (at most {most} at this size)" if most >= 1 else ""
                hints.append(f"fewer {count}{room}")
        hints += ["fewer rows", "a smaller input"]
        raise InvalidArgument(
            f"the {what} request costs {cost.total} element-evaluations ({cost.rows} rows"
            f"{passes} × {cost.elements} input elements per row), over "
            f"{limits.whose('max_request_cost')} max_request_cost={cap}: send "
            + ", ".join(hints[:-1])
            + f" or {hints[-1]}"
        )
    if cost.map_bytes > limits.max_map_bytes:
        raise InvalidArgument(
            f"the {what} request's maps take {cost.map_bytes} bytes, over "
            f"{limits.whose('max_map_bytes')} max_map_bytes={limits.max_map_bytes}: send "
            "fewer rows, fewer grad_modifiers, a smaller input or output_dtype float16 or uint8"
        )
