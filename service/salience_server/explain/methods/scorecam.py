"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks") and Faster-ScoreCAM (its top-k channels variant, as
tf-keras-vis's `Scorecam(max_N=k)`): class activation maps weighted by forward
passes instead of gradients.

With `A` the CAM layer's output (`penultimate_layer`, chosen as for Grad-CAM) and
`x` the explained input:

1. Faster-ScoreCAM only: per sample, keep the `k` channels of `A` with the largest
   spatial standard deviation (`top_channels`, default 10; tf-keras-vis keeps the
   union over the batch, which makes a map depend on its batch: not done).
2. Each kept channel `A_k` is resized to the input's spatial size (bilinear, as
   every CAM) and min–max normalised into a mask `H_k = (U_k − min) / (max − min + ε)`
   (ε = 1e-7).
3. The masked input `x ∘ H_k` (the mask multiplies every input channel) is scored:
   `α_k = f(x ∘ H_k)`, where `f` is the per-sample score of the objectives taken on
   the target layers' *activated* outputs — for a softmax head the class
   probability, the softmax of the logits, as the paper and tf-keras-vis (which
   softmaxes the linearised model's logits) do. The paper writes the weight as the
   increase `f(x ∘ H_k) − f(x_b)` over a baseline; `f(x_b)` is the same for every
   channel and both reference implementations drop it, so this does too.
4. `M = ReLU(Σ_k m(α)_k · A_k)`, with the request's grad modifier `m` applied to
   the weights as Grad-CAM applies it to the gradient its weights come from
   (default `none`), resized and normalised per sample as every CAM.

The `B·K` masked copies run as batched forward passes of at most `chunk_size` rows
(`forward_copies`); a Score-CAM request costs one forward pass per channel of the
CAM layer per sample (Faster-ScoreCAM: `k`), plus one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument
from salience_server.explain import backprop, common, modifiers
from salience_server.explain.engine import DeviceFunction, Method, RawTensors, per_sample
from salience_server.explain.methods import cam, copies, forward_copies
from salience_server.explain.options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOP_CHANNELS,
    FASTER_SCORECAM,
    SCORECAM,
    ExplainOptions,
)
from salience_server.explain.plan import Graph, Plan

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

TOP = "top_channels"
ACTIVATIONS = "scorecam/activations"  # the kept channels of A, (B, *spatial, k)
WEIGHTS = "scorecam/weights"  # α, (B, k)
SIZE = cam.SIZE
MASK_EPSILON = 1e-7  # tf-keras-vis's K.epsilon() in the masks' normalisation


def weighted_cam(a: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """`ReLU(Σ_k w_k · A_k)` for per-sample channel weights `w` (B, k)."""
    shape = tf.concat([tf.shape(weights)[:1], tf.ones([len(a.shape) - 2], tf.int32), [-1]], 0)
    return tf.nn.relu(tf.reduce_sum(a * tf.reshape(weights, shape), axis=-1))


@lru_cache(maxsize=256)
def scorecam_maps(
    grad_modifiers: tuple[str, ...], normalize: bool, output_dtype: str, rank: int
) -> Callable[..., tuple[tf.Tensor, ...]]:
    """A compiled function from (A, α, input spatial size) to one map per modifier."""
    spatial_rank = rank - 2

    @tf.function(
        input_signature=[
            tf.TensorSpec([None] * rank, tf.float32),
            tf.TensorSpec([None, None], tf.float32),
            tf.TensorSpec([spatial_rank], tf.int32),
        ],
        reduce_retracing=True,
    )
    def maps(a: tf.Tensor, weights: tf.Tensor, size: tf.Tensor) -> Any:
        out = []
        for name in grad_modifiers:
            m = weighted_cam(a, modifiers.GRAD_MODIFIERS[name](weights))
            m = cam.resize(m, size, spatial_rank)
            if normalize:
                low = cam.per_sample_reduce(tf.reduce_min, m)
                high = cam.per_sample_reduce(tf.reduce_max, m)
                m = (m - low) / (high - low + modifiers.EPSILON)
            out.append(cam.quantise(m, output_dtype))
        return tuple(out)

    return maps


def chunk_param(options: ExplainOptions, batch: int) -> tuple[int, np.ndarray]:
    """The request's rows per forward pass (checked against its bound when converted)
    and the per-sample param that carries it.
    """
    chunk = options.chunk_size or DEFAULT_CHUNK_SIZE
    return chunk, per_sample(np.array(chunk, np.int32), batch)


class ScoreCam(Method):
    name = SCORECAM
    default_grad_modifier = "none"
    needs_layers = True
    faster = False
    xla = False  # the copies scored per call follow tensor arguments

    def supported(self, runtime: ModelRuntime) -> str | None:
        return cam.unsupported_reason(runtime)

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        reason = self.supported(runtime)
        if reason is not None:
            raise FailedPrecondition(
                f"explanation.method={self.name!r} cannot explain model {runtime.name!r}: {reason}"
            )
        # The weights are confidences: the activated outputs (probabilities), not logits.
        plan = common.plan_targets(runtime, self, replace(options, keep_activation=True), batch)
        index = cam.resolve_penultimate(
            runtime, options, plan.graph.targets, plan.graph.input_index
        )
        plan.graph = replace(plan.graph, penultimate=index)
        layer = runtime.model.layers[index]
        channels = int(layer.output.shape[-1])
        chunk, plan.params[forward_copies.CHUNK] = chunk_param(options, batch)
        top = 0
        if self.faster:
            top = options.top_channels or min(DEFAULT_TOP_CHANNELS, channels)
            if not 1 <= top <= channels:
                raise InvalidArgument(
                    f"explanation.top_channels={options.top_channels} is out of range: CAM "
                    f"layer {layer.name!r} has {channels} channels (valid 1..{channels}, 0 for "
                    f"the default, {DEFAULT_TOP_CHANNELS} or every channel when fewer)"
                )
            plan.params[TOP] = per_sample(np.array(top, np.int32), batch)
            # k sets the shape of the kept activations: only equal k share a call.
            plan.share = (top,)
        # One forward pass per scored channel, and the unmasked one.
        plan.evaluations = (top or channels) + 1
        plan.resolved = replace(
            plan.resolved,
            penultimate_layer=layer.name,
            channels_reduced=True,
            chunk_size=chunk,
            top_channels=top,
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        assert graph.penultimate is not None  # set by plan
        plain = replace(graph, backprop_modifier="")
        model = backprop.explain_model(runtime, plain, (graph.penultimate,))
        scorer = backprop.explain_model(runtime, plain)
        n_targets = len(graph.targets)
        explained = graph.input_index
        faster = self.faster

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def scorecam(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            results = copies.call_model(model, inputs)
            outputs = tuple(results[n_targets + 1 :])
            a = tf.cast(results[n_targets], tf.float32)
            rank = len(a.shape)
            spatial = list(range(1, rank - 1))
            if faster:
                std = tf.math.reduce_std(a, axis=spatial)  # (B, K)
                _, kept = tf.math.top_k(std, tf.reduce_max(params[TOP]))
                a = tf.gather(a, kept, axis=-1, batch_dims=1)
            x = inputs[explained]
            size = tf.shape(x)[1:-1]
            channels = tf.shape(a)[-1]
            # (B, k, *spatial): a row's mask is one channel of its own sample.
            by_channel = tf.transpose(a, [0, rank - 1, *spatial])

            def make(rows: tf.Tensor, row_sample: tf.Tensor, row_copy: tf.Tensor) -> tf.Tensor:
                masks = tf.gather_nd(by_channel, tf.stack([row_sample, row_copy], axis=-1))
                masks = cam.resize(masks, size, rank - 2)
                low = cam.per_sample_reduce(tf.reduce_min, masks)
                high = cam.per_sample_reduce(tf.reduce_max, masks)
                masks = (masks - low) / (high - low + MASK_EPSILON)
                return rows * tf.cast(masks[..., None], rows.dtype)

            def fold(scores: tf.Tensor, copy_index: tf.Tensor) -> dict[str, tf.Tensor]:
                placed = tf.one_hot(copy_index, channels, dtype=tf.float32)  # (n, k)
                return {WEIGHTS: tf.matmul(scores, placed, transpose_a=True)}

            batch = tf.shape(x)[0]
            totals = forward_copies.fold_over_copies(
                scorer,
                inputs,
                explained,
                n_targets,
                params,
                channels,
                make,
                fold,
                {WEIGHTS: tf.zeros(tf.stack([batch, channels]), tf.float32)},
            )
            return outputs, {
                ACTIVATIONS: a,
                WEIGHTS: totals[WEIGHTS],
                SIZE: tf.tile(size[None], [batch, 1]),
            }

        return scorecam

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        a = raw[ACTIVATIONS]
        p = plan.post
        maps = scorecam_maps(p.grad_modifiers, p.normalize, p.output_dtype, len(a.shape))
        return dict(zip(p.grad_modifiers, maps(a, raw[WEIGHTS], raw[SIZE][0]), strict=True)), {}


class FasterScoreCam(ScoreCam):
    name = FASTER_SCORECAM
    faster = True
