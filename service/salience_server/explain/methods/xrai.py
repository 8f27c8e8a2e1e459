"""XRAI (Kapishnikov et al. 2019, "XRAI: Better Attributions Through Regions"), as
PAIR's saliency library defines it (`saliency.core.XRAI`, the "full" algorithm).

1. **Attributions**: Integrated Gradients as PAIR computes it for XRAI, with `m`
   points `α_k = k/(m−1)` (numpy's `linspace(0, 1, m)`, default m = 64), each
   weighted `1/m`: `IG = (x − x') ⊙ Σ_k ∂s/∂x at x' + α_k(x − x') / m`, averaged over
   the baselines — by default two, the constant images at each sample's minimum
   and maximum value (PAIR's default); the request's `baseline` replaces them — and
   reduced over channels by their max. All `B · baselines · m` points run in
   chunks on the device (`copies.sum_over_copies`).
2. **Regions**: scikit-image's Felzenszwalb segmentation (as the paper) of the
   image rescaled to [−1, 1] and resized to 224×224 (bicubic, anti-aliased), once
   per scale (default 50, 100, 150, 250, 500, 1200; σ = 0.8, minimum segment 150
   pixels), each segment resized back (nearest) and dilated by a disk of radius 5:
   PAIR's `_get_segments_felzenszwalb` with these parameters as options. This
   runs on the host, the one step that has no device kernel.
3. **Ranking** (on the device): starting from an empty selection, repeatedly add the
   region whose pixels not yet selected have the highest mean attribution (the
   gain), dropping regions that would add fewer than 50 new pixels (PAIR's
   `min_pixel_diff`), until none is left or the selection covers `area_threshold`
   of the image (default 1); every newly covered pixel gets the gain of the region
   that covered it, and pixels never covered the mean attribution over them. The
   map is that region-ranked attribution (PAIR's `attribution_mask`), one value per
   pixel: shape (height, width), or (height, width, 1) with `keepdims`. Its
   default grad modifier is "none": region gains keep their sign.

The dilation of every region is one convolution on the device (the same masks as
scikit-image's `dilation`). The ranking is PAIR's greedy loop, vectorised on the
device: pixels that belong to the same set of regions are one group (a few
thousand groups where a 224×224 image has 50176 pixels), and each round is two
matrix-vector products of the region masks with the unselected groups' pixel
counts and attribution sums, in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from skimage import segmentation
from skimage.morphology import disk
from skimage.transform import resize

from salience_server.errors import InvalidArgument
from salience_server.explain import backprop, common, modifiers
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import copies
from salience_server.explain.methods.blur_ig import image_input, image_reason
from salience_server.explain.methods.integrated_gradients import BASELINE, checked_baseline
from salience_server.explain.options import (
    DEFAULT_STEPS,
    DEFAULT_XRAI_AREA_THRESHOLD,
    DEFAULT_XRAI_DILATION_RADIUS,
    DEFAULT_XRAI_MIN_SIZE,
    DEFAULT_XRAI_SCALES,
    DEFAULT_XRAI_SIGMA,
    MAX_XRAI_DILATION_RADIUS,
    MAX_XRAI_MIN_SIZE,
    MAX_XRAI_REGIONS,
    MAX_XRAI_SCALE,
    MAX_XRAI_SCALES,
    MAX_XRAI_SIGMA,
    XRAI,
    ExplainOptions,
    in_range,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

MIN_MAX = "min-max"  # graph extra: PAIR's two constant baselines, made on the device
MAP = "xrai"
SCALES = "xrai/scales"  # (B, MAX_XRAI_SCALES), unused entries 0
SIGMA = "xrai/sigma"
MIN_SIZE = "xrai/min_size"
DILATION = "xrai/dilation_radius"
AREA = "xrai/area_threshold"
SEGMENTED_SHAPE = (224, 224)  # PAIR segments every image at this size
VALUE_RANGE = (-1.0, 1.0)  # ... rescaled to this range
MIN_PIXEL_DIFF = 50.0  # regions adding fewer new pixels are dropped (PAIR's default)


def segment_masks(
    image: np.ndarray, scales: Sequence[float], sigma: float, min_size: int
) -> np.ndarray:
    """The regions of one (height, width, channels) image as boolean masks (n, H, W),
    not yet dilated: PAIR's `_get_segments_felzenszwalb` with the given parameters.
    """
    shape = image.shape[:2]
    low, high = float(np.min(image)), float(np.max(image))
    # A constant image has no edges: every pixel at the bottom of the range.
    spread = high - low if high > low else 1.0
    scaled = (image - low) / spread * (VALUE_RANGE[1] - VALUE_RANGE[0]) + VALUE_RANGE[0]
    scaled = resize(
        scaled, SEGMENTED_SHAPE, order=3, mode="constant", preserve_range=True, anti_aliasing=True
    )
    masks: list[np.ndarray] = []
    for scale in scales:
        labels = segmentation.felzenszwalb(scaled, scale=scale, sigma=sigma, min_size=min_size)
        labels = resize(
            labels, shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False
        ).astype(int)
        masks.extend(labels == label for label in range(labels.min(), labels.max() + 1))
    return np.stack(masks)


def dilate(masks: tf.Tensor, footprint: tf.Tensor) -> tf.Tensor:
    """Boolean masks (n, H, W) dilated by a footprint (k, k) of 0s and 1s: scikit-image's
    `dilation(mask, footprint)` of every mask (pixels outside the image count as
    unset) as one convolution on the device.
    """
    kernel = tf.cast(footprint, tf.float32)[:, :, None, None]
    spread = tf.nn.conv2d(tf.cast(masks, tf.float32)[..., None], kernel, 1, "SAME")
    return spread[..., 0] > 0.5


def pixel_groups(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels grouped by the set of masks (n, P) they belong to: the masks over the
    groups (n, G) and every pixel's group (P,). The greedy ranking only ever sees
    unions of masks, so it can count and sum per group instead of per pixel.
    """
    count = masks.shape[0]
    packed = np.ascontiguousarray(np.packbits(masks, axis=0).T)
    # Each pixel's membership bits as one opaque key: a 1-D unique, 10x faster than
    # np.unique(axis=0) on the rows.
    keys = packed.view(f"V{packed.shape[1]}").ravel()
    groups, inverse = np.unique(keys, return_inverse=True)
    bits = groups.view(np.uint8).reshape(len(groups), -1).T
    members = np.unpackbits(bits, axis=0, count=count).astype(bool)
    return members, inverse.reshape(-1)


def rank_regions(
    members: tf.Tensor,
    sizes: tf.Tensor,
    sums: tf.Tensor,
    pixels: tf.Tensor,
    area_threshold: tf.Tensor,
    min_pixel_diff: tf.Tensor,
) -> tf.Tensor:
    """PAIR's `XRAI._xrai` for one image, over pixel groups: the masks (n, G), each
    group's pixel count and attribution sum (G,) in float64, the image's pixel count;
    each group's region-ranked attribution (G,).
    """
    weights = tf.cast(members, tf.float64)
    count = tf.shape(members)[0]
    infinity = tf.constant(np.inf, tf.float64)

    def body(alive: tf.Tensor, current: tf.Tensor, output: tf.Tensor, area: tf.Tensor) -> Any:
        free = 1.0 - tf.cast(current, tf.float64)
        new_pixels = tf.linalg.matvec(weights, free * sizes)
        alive = tf.logical_and(alive, new_pixels >= min_pixel_diff)
        any_alive = tf.reduce_any(alive)
        gains = tf.linalg.matvec(weights, free * sums) / tf.maximum(new_pixels, 1.0)
        gain = tf.where(alive, gains, -infinity)
        best = tf.argmax(gain, output_type=tf.int32)
        chosen = tf.logical_and(members[best], any_alive)
        added = tf.logical_and(chosen, tf.logical_not(current))
        output = tf.where(added, gain[best], output)
        current = tf.logical_or(current, chosen)
        area = tf.reduce_sum(tf.cast(current, tf.float64) * sizes) / pixels
        alive = tf.logical_and(alive, tf.not_equal(tf.range(count), best))
        return alive, current, output, area

    _, _, output, _ = tf.while_loop(
        lambda alive, current, output, area: tf.logical_and(
            area <= area_threshold, tf.reduce_any(alive)
        ),
        body,
        (
            tf.ones([count], tf.bool),
            tf.zeros_like(sizes, tf.bool),
            tf.fill(tf.shape(sizes), -infinity),
            tf.constant(0.0, tf.float64),
        ),
    )
    uncovered = tf.equal(output, -infinity)
    rest = tf.reduce_sum(tf.where(uncovered, sums, 0.0)) / tf.maximum(
        tf.reduce_sum(tf.where(uncovered, sizes, 0.0)), 1.0
    )
    return tf.where(uncovered, rest, output)


class Xrai(Method):
    name = XRAI
    default_grad_modifier = "none"

    def supported(self, runtime: ModelRuntime) -> str | None:
        return image_reason(runtime)

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        common.refuse_wrt(
            self, options, "its attributions are Integrated Gradients of the model input"
        )
        steps = options.steps or DEFAULT_STEPS
        if steps < 1:
            raise InvalidArgument(
                f"explanation.steps={options.steps} is not allowed: use a positive count "
                f"(0 for the default, {DEFAULT_STEPS})"
            )
        scales = options.xrai_scales or DEFAULT_XRAI_SCALES
        if len(scales) > MAX_XRAI_SCALES:
            raise InvalidArgument(
                f"explanation.xrai_scales has {len(scales)} entries, over the most of "
                f"{MAX_XRAI_SCALES}: list at most {MAX_XRAI_SCALES} scales"
            )
        for k, scale in enumerate(scales):
            if not (np.isfinite(scale) and 0 < scale <= MAX_XRAI_SCALE):
                raise InvalidArgument(
                    f"explanation.xrai_scales[{k}]={scale:g} is out of range: use scales with "
                    f"0 < scale <= {MAX_XRAI_SCALE:g} (empty means "
                    f"{', '.join(f'{v:g}' for v in DEFAULT_XRAI_SCALES)})"
                )
        sigma = in_range(
            "xrai_sigma", options.xrai_sigma, DEFAULT_XRAI_SIGMA, 0, MAX_XRAI_SIGMA, False
        )
        min_size = int(
            in_range(
                "xrai_min_size",
                options.xrai_min_size,
                DEFAULT_XRAI_MIN_SIZE,
                1,
                MAX_XRAI_MIN_SIZE,
                False,
            )
        )
        most = len(scales) * MAX_XRAI_MIN_SIZE // min_size
        if most > MAX_XRAI_REGIONS:
            smallest = -(-len(scales) * MAX_XRAI_MIN_SIZE // MAX_XRAI_REGIONS)
            raise InvalidArgument(
                f"explanation.xrai_min_size={min_size} allows up to {most} regions with "
                f"{len(scales)} scales, over the most of {MAX_XRAI_REGIONS}: use "
                f"xrai_min_size >= {smallest}, or fewer xrai_scales"
            )
        radius = int(
            in_range(
                "xrai_dilation_radius",
                options.xrai_dilation_radius,
                DEFAULT_XRAI_DILATION_RADIUS,
                0,
                MAX_XRAI_DILATION_RADIUS,
                False,
            )
        )
        area = in_range(
            "xrai_area_threshold",
            options.xrai_area_threshold,
            DEFAULT_XRAI_AREA_THRESHOLD,
            0,
            1,
            True,
        )
        index = common.input_index(runtime, options)
        image_input(runtime, self.name, index)
        if options.baseline is None:
            baseline = None
            extra: tuple[Any, ...] = (MIN_MAX,)
        else:
            baseline = checked_baseline(runtime, index, options.baseline, batch)
            extra = (BASELINE, tuple(baseline.shape[1:]))
        plan = backprop.plan_gradient(runtime, self, options, batch, with_wrt=False, extra=extra)
        baselines = 2 if baseline is None else 1
        copies.plan_count(plan, "steps", steps, steps * baselines, runtime.placement.xla)
        if baseline is not None:
            plan.params[BASELINE] = baseline
        padded = np.zeros(MAX_XRAI_SCALES, np.float64)
        padded[: len(scales)] = scales
        plan.params[SCALES] = per_sample(padded, batch)
        plan.params[SIGMA] = per_sample(np.array(sigma, np.float64), batch)
        plan.params[MIN_SIZE] = per_sample(np.array(min_size, np.int32), batch)
        plan.params[DILATION] = per_sample(np.array(radius, np.int32), batch)
        plan.params[AREA] = per_sample(np.array(area, np.float64), batch)
        plan.resolved = dataclasses.replace(
            plan.resolved,
            steps=steps,
            channels_reduced=True,
            xrai_scales=tuple(float(s) for s in scales),
            xrai_sigma=sigma,
            xrai_min_size=min_size,
            xrai_dilation_radius=radius,
            xrai_area_threshold=area,
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        model = backprop.explain_model(runtime, graph)
        n_targets = len(graph.targets)
        explained = graph.input_index
        min_max = graph.extra == (MIN_MAX,)
        baselines = 2 if min_max else 1
        name = runtime.inputs[explained].name

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def attributions(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            x = inputs[explained]
            points = copies.copy_count(graph.steps * baselines if graph.steps else 0, params)
            steps = points // baselines
            outputs = copies.call_model(model, inputs)[n_targets:]
            axes = list(range(1, len(x.shape)))
            ones = tf.ones_like(x)
            if min_max:
                low = tf.reduce_min(x, axis=axes, keepdims=True) * ones
                high = tf.reduce_max(x, axis=axes, keepdims=True) * ones
                starts = tf.stack([low, high])  # (baselines, B, ...)
            else:
                starts = params[BASELINE][None]
            last = tf.maximum(steps - 1, 1)
            spacing = 1.0 / tf.cast(last, tf.float64)

            def alpha(row_copy: tf.Tensor) -> tf.Tensor:
                # numpy's linspace(0, 1, m): k · (1/(m − 1)), the last point exactly 1.
                k = row_copy % steps
                value = tf.cast(k, tf.float64) * spacing
                return tf.where(
                    tf.logical_and(k == steps - 1, steps > 1), tf.constant(1.0, tf.float64), value
                )

            def perturb(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                start = tf.gather_nd(starts, tf.stack([row_copy // steps, row_sample], axis=1))
                a = tf.reshape(alpha(row_copy), [-1] + [1] * len(axes))
                start64 = tf.cast(start, tf.float64)
                return tf.cast(start64 + a * (tf.cast(rows, tf.float64) - start64), rows.dtype)

            def contribute(grads: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                which = copy_index // steps
                return {
                    f"sum/{j}": tf.reduce_sum(
                        tf.where(tf.reshape(which == j, [-1] + [1] * (len(axes) + 1)), grads, 0.0),
                        axis=0,
                    )
                    for j in range(baselines)
                }

            totals = copies.sum_over_copies(
                model,
                inputs,
                explained,
                n_targets,
                params,
                points,
                perturb,
                contribute,
                {f"sum/{j}": copies.zeros_like_float(x) for j in range(baselines)},
                static_chunks=runtime.placement.xla,
            )
            count = tf.cast(steps, tf.float32)
            attr = tf.add_n(
                [
                    tf.cast(x - starts[j], tf.float32) * totals[f"sum/{j}"] / count
                    for j in range(baselines)
                ]
            ) / float(baselines)
            return tuple(outputs), tf.reduce_max(attr, axis=-1)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, None], tf.bool),
                tf.TensorSpec([None, None], tf.bool),
            ]
        )
        def dilated(masks: tf.Tensor, footprint: tf.Tensor) -> tf.Tensor:
            runtime.count_trace()
            return dilate(masks, footprint)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None], tf.bool),
                tf.TensorSpec([None], tf.float64),
                tf.TensorSpec([None], tf.float64),
                tf.TensorSpec([], tf.float64),
                tf.TensorSpec([], tf.float64),
            ]
        )
        def ranked(
            members: tf.Tensor,
            sizes: tf.Tensor,
            sums: tf.Tensor,
            pixels: tf.Tensor,
            area: tf.Tensor,
        ) -> tf.Tensor:
            runtime.count_trace()
            minimum = tf.constant(MIN_PIXEL_DIFF, tf.float64)
            return rank_regions(members, sizes, sums, pixels, area, minimum)

        def xrai(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            if not min_max:
                shape = tuple(inputs[explained].shape[1:])
                if shape != graph.extra[1]:
                    raise InvalidArgument(
                        f"explanation.baseline has sample shape {list(graph.extra[1])} but input "
                        f"{name!r} has samples of shape {list(shape)}: send a baseline of the "
                        "inputs' sample shape"
                    )
            outputs, attr = attributions(inputs, params)
            images = np.asarray(inputs[explained])
            host_attr = np.asarray(attr, np.float64)
            scales = np.asarray(params[SCALES])
            sigma = np.asarray(params[SIGMA])
            min_size = np.asarray(params[MIN_SIZE])
            radius = np.asarray(params[DILATION])
            area = np.asarray(params[AREA])
            maps = []
            for b in range(images.shape[0]):
                masks = segment_masks(
                    images[b],
                    [float(s) for s in scales[b] if s > 0],
                    float(sigma[b]),
                    int(min_size[b]),
                )
                # disk(0) is the 1x1 footprint: radius 0 leaves the masks as they are.
                masks = np.asarray(dilated(masks, disk(int(radius[b])).astype(bool)))
                members, group = pixel_groups(masks.reshape(len(masks), -1))
                flat = host_attr[b].reshape(-1)
                sizes = np.bincount(group, minlength=members.shape[1]).astype(np.float64)
                sums = np.bincount(group, weights=flat, minlength=members.shape[1])
                values = ranked(members, sizes, sums, float(flat.size), float(area[b]))
                maps.append(np.asarray(values)[group].reshape(host_attr[b].shape))
            stacked = np.stack(maps).astype(np.float32) if maps else host_attr.astype(np.float32)
            return outputs, {MAP: tf.constant(stacked)}

        return xrai

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        p = plan.post
        region_map = raw[MAP]
        if p.keepdims:
            region_map = region_map[..., None]
        finish = modifiers.map_function(
            p.grad_modifiers, False, p.normalize, p.output_dtype, len(region_map.shape)
        )
        return dict(zip(p.grad_modifiers, finish(region_map), strict=True)), {}
