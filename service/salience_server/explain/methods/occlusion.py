"""Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional
Networks"): how much the score drops when a window of the input is covered.

A square (cube) window of side `w` pixels on every spatial axis (`window`, default
16, or the input's smallest spatial extent when the model fixes it and it is
smaller; samples of free extent must fit the window) slides over the
input in steps of `s` pixels (`stride`, default `max(1, w // 2)`, at most `w`).
On an axis of extent `n` the window starts at `min(j·s, n − w)` for
`j = 0..ceil((n − w) / s)`: the last position is flush with the far edge, so every
pixel is covered. At each position `p` every channel of the covered pixels is set to
the value `v` (`occlusion_value`, default 0) and the copy `x_p` is scored:

    d_p = s(x) − s(x_p)
    M(i) = mean of d_p over the positions p whose window covers pixel i

(Captum's `Occlusion` with a final flush window; PAIR's saliency sums instead of
averaging). `s` is the per-sample score of the objectives, logits by default like
the gradient methods. The map has the input's spatial shape and no channel axis;
the request's grad modifiers (default `none`: score drops are positive, rises
negative) apply to `M` element-wise, then normalisation per sample.

All `P` occluded copies of all `B` samples run as batched forward passes of at most
`chunk_size` rows (`forward_copies`): a request costs `B·(P + 1)` forward passes,
and `P` is bounded by the server's `max_windows`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument
from salience_server.explain import backprop, common, modifiers
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import copies, forward_copies
from salience_server.explain.methods.scorecam import chunk_param
from salience_server.explain.options import (
    DEFAULT_OCCLUSION_VALUE,
    DEFAULT_WINDOW,
    OCCLUSION,
    ExplainOptions,
    Limits,
    default_stride,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

WINDOW = "window"
STRIDE = "stride"
VALUE = "occlusion_value"
MAP = "occlusion/map"
MAX_SPATIAL_RANK = 3


def extents(runtime: ModelRuntime, index: int) -> tuple[int | None, ...]:
    """The explained input's spatial extents (None where free); FailedPrecondition
    when it has no spatial axes to slide a window over.
    """
    info = runtime.inputs[index]
    spatial = tuple(info.shape[1:-1])
    if not 1 <= len(spatial) <= MAX_SPATIAL_RANK:
        raise FailedPrecondition(
            f"explanation.method={OCCLUSION!r} cannot explain input {info.name!r} of shape "
            f"{info.shape}: occlusion slides a window over 1 to 3 spatial axes between the "
            "batch and the channel axis"
        )
    return spatial


def window_and_stride(
    options: ExplainOptions, sizes: Sequence[int | None], name: str
) -> tuple[int, int]:
    """The request's window and stride (defaults filled in), checked against the
    input's known spatial extents.
    """
    known = [n for n in sizes if n is not None]
    smallest = min(known) if known else None
    window = options.window or (
        DEFAULT_WINDOW if smallest is None else min(DEFAULT_WINDOW, smallest)
    )
    if smallest is not None and window > smallest:
        raise InvalidArgument(
            f"explanation.window={options.window} is out of range: input {name!r} has "
            f"spatial extent {list(sizes)} (valid 1..{smallest}, 0 for the default, "
            f"{DEFAULT_WINDOW} or the smallest extent when smaller)"
        )
    stride = options.stride or default_stride(window)
    if stride > window:
        raise InvalidArgument(
            f"explanation.stride={options.stride} is out of range: use 1..{window} (at most "
            f"the window, {window}; 0 for the default, {default_stride(window)})"
        )
    return window, stride


def window_count(sizes: Sequence[int], window: int, stride: int) -> int:
    """Window positions over extents `sizes`: Π (ceil((n − w) / s) + 1)."""
    return math.prod(-(-(n - window) // stride) + 1 for n in sizes)


def check_windows(runtime: ModelRuntime, options: ExplainOptions, limits: Limits) -> None:
    """Refuses, before any work, an occlusion whose window positions per sample are
    over the server's `max_windows` (inputs with free spatial axes: when computed).
    """
    index = common.input_index(runtime, options)
    sizes = extents(runtime, index)
    window, stride = window_and_stride(options, sizes, runtime.inputs[index].name)
    if any(n is None for n in sizes):
        return
    count = window_count([int(n) for n in sizes if n is not None], window, stride)
    if count > limits.max_windows:
        raise InvalidArgument(
            f"explanation.window={window} with stride={stride} gives {count} occluded copies "
            f"per sample, over {limits.whose('max_windows')} max_windows={limits.max_windows}: "
            "use a larger window or stride"
        )


class Occlusion(Method):
    name = OCCLUSION
    default_grad_modifier = "none"
    xla = False  # the copies scored per call follow tensor arguments

    def supported(self, runtime: ModelRuntime) -> str | None:
        if any(
            "float" in info.dtype and 1 <= len(info.shape) - 2 <= MAX_SPATIAL_RANK
            for info in runtime.inputs
        ):
            return None
        return (
            "none of its inputs has spatial axes (rank 3 to 5, batch first, floating point) "
            "to slide a window over"
        )

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(self, options, "it occludes windows of the model input")
        index = common.input_index(runtime, options)
        sizes = extents(runtime, index)
        window, stride = window_and_stride(options, sizes, runtime.inputs[index].name)
        value = (
            DEFAULT_OCCLUSION_VALUE if options.occlusion_value is None else options.occlusion_value
        )
        free = tuple(k for k, n in enumerate(sizes) if n is None)
        plan = common.plan_targets(runtime, self, options, batch, extra=(free,))
        chunk, plan.params[forward_copies.CHUNK] = chunk_param(options, batch)
        plan.params[WINDOW] = per_sample(np.array(window, np.int32), batch)
        plan.params[STRIDE] = per_sample(np.array(stride, np.int32), batch)
        plan.params[VALUE] = per_sample(np.array(value, np.float32), batch)
        # Window and stride set the number of copies: only equal ones share a call.
        plan.share = (window, stride)
        if not free:
            # One forward pass per window position, and the unoccluded one (with free
            # spatial axes the count is only known when computed: max_windows bounds it).
            fixed = [int(n) for n in sizes if n is not None]
            plan.evaluations = window_count(fixed, window, stride) + 1
        plan.resolved = replace(
            plan.resolved,
            channels_reduced=True,
            chunk_size=chunk,
            window=window,
            stride=stride,
            occlusion_value=float(value),
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, replace(graph, backprop_modifier=""))
        n_targets = len(graph.targets)
        explained = graph.input_index

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def occlusion(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            rank = len(x.shape)
            results = copies.call_model(model, inputs)
            weights = copies.score_weights(params)
            base = common.per_sample_score(results[:n_targets], weights)  # (B,)
            window = tf.reduce_max(params[WINDOW])
            stride = tf.reduce_max(params[STRIDE])
            sizes = tf.shape(x)[1:-1]
            positions = (sizes - window + stride - 1) // stride + 1  # per axis
            total = tf.reduce_prod(positions)
            axes = rank - 2

            def covers(axis: int, position: tf.Tensor) -> tf.Tensor:
                """(n, extent) indicator of the pixels window `position` covers."""
                start = tf.minimum(position * stride, sizes[axis] - window)
                pixel = tf.range(sizes[axis])[None, :]
                inside = (pixel >= start[:, None]) & (pixel < start[:, None] + window)
                return tf.cast(inside, tf.float32)

            def masks(flat: tf.Tensor) -> tf.Tensor:
                """(n, *spatial) masks of the windows with flat indices `flat`."""
                place = tf.unravel_index(flat, positions)  # (axes, n)
                mask = None
                for axis in range(axes):
                    shape = [-1] + [1] * axes
                    shape[axis + 1] = sizes[axis]
                    part = tf.reshape(covers(axis, place[axis]), tf.stack(shape))
                    mask = part if mask is None else mask * part
                assert mask is not None
                return mask

            value = params[VALUE]

            def make(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                m = tf.cast(masks(row_copy)[..., None], rows.dtype)
                v = tf.reshape(
                    tf.cast(tf.gather(value, row_sample), rows.dtype), [-1] + [1] * (rank - 1)
                )
                return rows * (1 - m) + v * m

            batch = tf.shape(x)[0]

            def fold(scores: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                drops = base[None, :] - scores  # (n, B)
                m = masks(copy_index)
                flat = tf.reshape(m, tf.stack([tf.shape(m)[0], -1]))
                summed = tf.matmul(drops, flat, transpose_a=True)  # (B, pixels)
                return {MAP: tf.reshape(summed, tf.concat([[batch], sizes], 0))}

            totals = forward_copies.fold_over_copies(
                model,
                inputs,
                explained,
                n_targets,
                params,
                total,
                make,
                fold,
                {MAP: tf.zeros(tf.concat([[batch], sizes], 0), tf.float32)},
            )
            # How many windows cover each pixel: a product of per-axis counts.
            count = None
            for axis in range(axes):
                shape = [1] * axes
                shape[axis] = sizes[axis]
                per_axis = tf.reduce_sum(covers(axis, tf.range(positions[axis])), axis=0)
                part = tf.reshape(per_axis, tf.stack(shape))
                count = part if count is None else count * part
            assert count is not None
            averaged = totals[MAP] / tf.maximum(count, 1.0)[None]
            return tuple(results[n_targets:]), {MAP: averaged}

        free: tuple[int, ...] = graph.extra[0]
        if not free:
            return occlusion
        name = runtime.inputs[explained].name

        def checked(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            # Free spatial axes are only known here: the window must fit them (their
            # extent, and so the positions, are bounded by max_free_axis_size).
            sizes = [int(n) for n in inputs[explained].shape[1:-1]]
            window = int(np.max(params[WINDOW]))
            if window > min(sizes):
                raise InvalidArgument(
                    f"explanation.window={window} is out of range: input {name!r} has samples "
                    f"of spatial extent {sizes} (valid 1..{min(sizes)})"
                )
            return occlusion(inputs, params)

        return checked

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        m, p = raw[MAP], plan.post
        # The map has no channel axis: nothing to reduce.
        finish = modifiers.map_function(
            p.grad_modifiers, False, p.normalize, p.output_dtype, len(m.shape)
        )
        return dict(zip(p.grad_modifiers, finish(m), strict=True)), {}
