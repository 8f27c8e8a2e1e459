"""Grad-CAM, Grad-CAM++ and Guided Grad-CAM: class activation maps from a layer's
activations weighted by the score's gradient (keras-vis `visualize_cam`).

`A` is the output of the *CAM layer* (`penultimate_layer`), `G = ∂s/∂A` for the
per-sample score `s`, and `Gc = m(G)` for the request's grad modifier `m` (default
`none`). Spatial axes are the axes between the batch and the channel axis.

- **Grad-CAM** (Selvaraju et al. 2017): `α_k = mean over spatial positions of
  Gc[..., k]`, `M = ReLU(Σ_k α_k · A[..., k])`. (keras-vis divided `Gc` by its
  global max first, which flips every weight when all are negative: not done.)
- **Grad-CAM++** (Chattopadhay et al. 2018), exactly as tf-keras-vis's
  `GradcamPlusPlus` computes it, with the class score taken as `Y = exp(s)`:
  `first = Y·Gc`, `second = Y·Gc²`, `third = Y·Gc³`;
  `a_k = second / (2·second + third · Σ_spatial A_k + 1[second = 0])`;
  `a_k ← a_k / (Σ_spatial a_k + 1[Σ_spatial a_k = 0])`;
  `w_k = Σ_spatial ReLU(first) · a_k`; `M = ReLU(Σ_k w_k · A_k)`.
  `Y` cancels in `a_k`, so `M = exp(s) · M₀`, and the server computes `M₀` and
  applies the factor in float64 at the end (in normalisation it only scales ε), so
  large scores do not overflow; a raw (`normalize=false`) map still carries it.
  With several objectives `s` is their weighted sum (one `exp`, not one per term).
- **Guided Grad-CAM** (Selvaraju et al. 2017): the guided-backprop input gradient
  (`backprop_modifier=guided`, always) times the upsampled Grad-CAM map computed
  with the ordinary gradient, without a grad modifier and before normalisation:
  `P = G_guided(x) · resize(ReLU(Σ_k mean_spatial(G)_k · A_k))[..., None]`. `P`
  is then finished like a gradient map: grad modifiers (default `absolute`), the
  channel max unless keepdims, per-sample normalisation, dtype.

Grad-CAM and Grad-CAM++ maps are resized to the explained input's spatial size
with (bi/tri)linear interpolation (`tf.image.resize`, half-pixel centres), then
normalised per sample as every map is; they have no channel axis.

The CAM layer is by default the *last* layer, in `model.layers` order, among the
layers the objectives' layers are computed from, whose single output has the
input's spatial axes with an extent larger than 1×1 (a layer that pools to 1×1,
as keras-vis picked on ResNet50, is never chosen; an unknown extent counts as
larger). It may be named by name or index instead. A model without such a layer
cannot be explained by these methods at all: `supported` says why.

The device function returns `A` and `∂s/∂A` (and `s`, the input's spatial size,
and for Guided Grad-CAM the guided input gradient); the grad modifier, weights,
resizing and normalisation run in `finish`, per request, on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from salience_server.errors import FailedPrecondition, InvalidArgument, allowed
from salience_server.explain import ancestry, backprop, common, modifiers
from salience_server.explain.engine import DeviceFunction, Method, RawTensors
from salience_server.explain.options import (
    GRADCAM,
    GRADCAM_PLUS_PLUS,
    GUIDED_GRADCAM,
    ExplainOptions,
)
from salience_server.explain.plan import Graph, Plan
from salience_server.explain.targets import Target, resolve_layer
from salience_server.explain.wrt import field_value

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

FIELD = "explanation.penultimate_layer"
ACTIVATIONS = "cam/activations"
CAM_GRADS = "cam/grads"
SCORES = "cam/scores"
SIZE = "cam/size"
GRADS = "grads"
MAX_SPATIAL_RANK = 3  # resizing handles 1-D, 2-D and 3-D maps


# Which layers can carry a CAM -------------------------------------------------


def spatial_rank(runtime: ModelRuntime, input_index: int) -> int:
    return len(runtime.inputs[input_index].shape) - 2


def cam_layer_problem(layer: keras.layers.Layer, spatial_rank: int) -> str | None:
    """Why a layer's output cannot carry a CAM for an input with `spatial_rank`
    spatial axes; None when it can.
    """
    if isinstance(layer, keras.layers.InputLayer):
        return "is an input layer"
    out = ancestry.single_output(layer)
    if out is None:
        return "has several outputs"
    shape = tuple(out.shape)
    if len(shape) != spatial_rank + 2:
        return (
            f"has output shape {shape}, without the {spatial_rank} spatial axes of the input "
            "(no spatial extent)"
        )
    if all(d is not None and d <= 1 for d in shape[1:-1]):
        return f"has output shape {shape}: its spatial extent is 1×1"
    if "float" not in str(out.dtype):
        return f"has output dtype {out.dtype}"
    return None


def candidates(runtime: ModelRuntime, targets: Sequence[Target], input_index: int) -> list[int]:
    """Indices of the layers that can be the CAM layer of these targets, in order."""
    model = runtime.model
    rank = spatial_rank(runtime, input_index)
    above: set[int] = set()
    for target in targets:
        above |= ancestry.ancestors(model, target.layer_index)
    return [
        i
        for i in sorted(above)
        if cam_layer_problem(model.layers[i], rank) is None
        and ancestry.depends_on_input(model, i, input_index)
    ]


def unsupported_reason(runtime: ModelRuntime) -> str | None:
    """Why no CAM can be computed for this model at all (cached on the runtime)."""
    return runtime.derive(("cam-scan",), lambda: _find_unsupported_reason(runtime))


def _find_unsupported_reason(runtime: ModelRuntime) -> str | None:
    model = runtime.model
    spatial = [
        k
        for k, info in enumerate(runtime.inputs)
        if "float" in info.dtype and 1 <= len(info.shape) - 2 <= MAX_SPATIAL_RANK
    ]
    if not spatial:
        return (
            "none of its inputs has spatial axes (rank 3 to 5, batch first), which a class "
            "activation map is resized to"
        )
    for k in spatial:
        rank = spatial_rank(runtime, k)
        for i, layer in enumerate(model.layers):
            if cam_layer_problem(layer, rank) is None and ancestry.depends_on_input(model, i, k):
                return None
    return (
        "it has no layer whose output has spatial extent larger than 1×1 (a convolution-like "
        "layer keeping the input's spatial axes), which a class activation map is computed on"
    )


def resolve_penultimate(
    runtime: ModelRuntime, options: ExplainOptions, targets: Sequence[Target], input_index: int
) -> int:
    """The CAM layer's index: the request's, checked, or the default rule's."""
    model = runtime.model
    layers = model.layers
    rank = spatial_rank(runtime, input_index)
    if not 1 <= rank <= MAX_SPATIAL_RANK:
        raise InvalidArgument(
            f"explanation.input={runtime.inputs[input_index].name!r} has shape "
            f"{runtime.inputs[input_index].shape}: a class activation map needs an input "
            "with 1 to 3 spatial axes between the batch and the channel axis"
        )
    usable = candidates(runtime, targets, input_index)
    usable_names = [layers[i].name for i in usable]
    target_names = allowed(sorted({layers[t.layer_index].name for t in targets}))
    selector = options.penultimate_layer
    if selector is None:
        if not usable:
            raise InvalidArgument(
                f"{FIELD}: no layer that the objectives' layer {target_names} is computed from "
                "has an output with spatial extent larger than 1×1 (a class activation map "
                "needs one): choose a later objective layer"
            )
        return usable[-1]
    index, layer = resolve_layer(model, selector, FIELD)
    if index in usable:
        return index
    problem = cam_layer_problem(layer, rank)
    if problem is None:
        above: set[int] = set()
        for target in targets:
            above |= ancestry.ancestors(model, target.layer_index)
        if index not in above:
            problem = (
                f"is not a layer the objectives' layer {target_names} is computed from (it is "
                "the target itself, comes after it or lies on another branch)"
            )
        else:
            problem = f"does not depend on input {runtime.inputs[input_index].name!r}"
    choices = allowed(usable_names) if usable_names else "none: choose a later objective layer"
    raise InvalidArgument(
        f"{field_value(FIELD, selector)} names layer {layer.name!r}, which {problem}: "
        f"choose one of {choices}"
    )


# Finishing, on the device -----------------------------------------------------


def resize(cam: tf.Tensor, size: tf.Tensor, spatial_rank: int) -> tf.Tensor:
    """Linear interpolation of (B, *spatial) maps to `size` (half-pixel centres, as
    `tf.image.resize` bilinear; separable, so 1-D and 3-D reuse it axis by axis).
    """
    if spatial_rank == 2:
        return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    if spatial_rank == 1:
        resized = tf.image.resize(cam[:, :, None, None], tf.stack([size[0], 1]), "bilinear")
        return resized[:, :, 0, 0]
    batch, depth, height, width = tf.unstack(tf.shape(cam))
    planes = tf.image.resize(tf.reshape(cam, [batch * depth, height, width, 1]), size[1:])
    columns = tf.reshape(planes, [batch, depth, size[1] * size[2], 1])
    volume = tf.image.resize(columns, tf.stack([size[0], size[1] * size[2]]), "bilinear")
    return tf.reshape(volume, [batch, size[0], size[1], size[2]])


def gradcam(a: tf.Tensor, gc: tf.Tensor) -> tf.Tensor:
    """`ReLU(Σ_k mean_spatial(Gc)_k · A_k)`, shape (B, *spatial)."""
    spatial = list(range(1, len(a.shape) - 1))
    alpha = tf.reduce_mean(gc, axis=spatial, keepdims=True)
    return tf.nn.relu(tf.reduce_sum(a * alpha, axis=-1))


def gradcam_plus_plus(a: tf.Tensor, gc: tf.Tensor) -> tf.Tensor:
    """tf-keras-vis's Grad-CAM++ without the per-sample factor `exp(s)` (it cancels in
    the weights `a_k` and scales the map: the caller applies it).
    """
    spatial = list(range(1, len(a.shape) - 1))
    second = gc * gc
    third = second * gc
    global_sum = tf.reduce_sum(a, axis=spatial, keepdims=True)
    denominator = 2.0 * second + third * global_sum
    denominator += tf.cast(tf.equal(second, 0.0), second.dtype)
    alphas = second / denominator
    norm = tf.reduce_sum(alphas, axis=spatial, keepdims=True)
    norm += tf.cast(tf.equal(norm, 0.0), norm.dtype)
    alphas = alphas / norm
    weights = tf.reduce_sum(tf.nn.relu(gc) * alphas, axis=spatial, keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * a, axis=-1))


def per_sample_reduce(reduce: Callable[..., tf.Tensor], s: tf.Tensor) -> tf.Tensor:
    return reduce(s, axis=list(range(1, len(s.shape))), keepdims=True)


def quantise(s: tf.Tensor, output_dtype: str) -> tf.Tensor:
    if output_dtype == "uint8":
        return tf.cast(tf.round(tf.clip_by_value(s, 0.0, 1.0) * 255.0), tf.uint8)
    return tf.cast(s, tf.as_dtype(output_dtype))


@lru_cache(maxsize=256)
def cam_maps(
    method: str,
    grad_modifiers: tuple[str, ...],
    normalize: bool,
    output_dtype: str,
    rank: int,
) -> Callable[..., tuple[tf.Tensor, ...]]:
    """A compiled function from (A, ∂s/∂A, s, input spatial size) to one CAM per grad
    modifier; traced once per option set and activation rank.
    """
    spatial_rank = rank - 2
    spec = tf.TensorSpec([None] * rank, tf.float32)

    @tf.function(
        input_signature=[
            spec,
            spec,
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([spatial_rank], tf.int32),
        ],
        reduce_retracing=True,
    )
    def maps(a: tf.Tensor, g: tf.Tensor, scores: tf.Tensor, size: tf.Tensor) -> Any:
        out = []
        log_scale = tf.reshape(tf.cast(scores, tf.float64), [-1] + [1] * spatial_rank)
        for name in grad_modifiers:
            gc = modifiers.GRAD_MODIFIERS[name](g)
            if method == GRADCAM_PLUS_PLUS:
                cam = tf.cast(resize(gradcam_plus_plus(a, gc), size, spatial_rank), tf.float64)
                if normalize:
                    # normalise(exp(s)·M₀) = (M₀ − min) / (max − min + ε·exp(−s)).
                    low = per_sample_reduce(tf.reduce_min, cam)
                    high = per_sample_reduce(tf.reduce_max, cam)
                    epsilon = modifiers.EPSILON * tf.exp(-log_scale)
                    cam = (cam - low) / (high - low + epsilon)
                else:
                    cam = cam * tf.exp(log_scale)
                out.append(quantise(cam, output_dtype))
                continue
            cam = resize(gradcam(a, gc), size, spatial_rank)
            if normalize:
                low = per_sample_reduce(tf.reduce_min, cam)
                high = per_sample_reduce(tf.reduce_max, cam)
                cam = (cam - low) / (high - low + modifiers.EPSILON)
            out.append(quantise(cam, output_dtype))
        return tuple(out)

    return maps


@lru_cache(maxsize=16)
def guided_product(rank: int) -> Callable[..., tf.Tensor]:
    """A compiled function from (guided input gradient, A, ∂s/∂A) to Guided Grad-CAM's
    raw map: the gradient times the upsampled Grad-CAM (no modifier, not normalised).
    """
    spatial_rank = rank - 2
    spec = tf.TensorSpec([None] * rank, tf.float32)

    @tf.function(input_signature=[spec, spec, spec])
    def product(grads: tf.Tensor, a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
        size = tf.shape(grads)[1:-1]
        cam = resize(gradcam(a, g), size, spatial_rank)
        return grads * cam[..., None]

    return product


# The methods --------------------------------------------------------------------


class CamMethod(Method):
    default_grad_modifier = "none"
    needs_layers = True
    guided = False

    def supported(self, runtime: ModelRuntime) -> str | None:
        reason = unsupported_reason(runtime)
        if reason is None and self.guided:
            guided = backprop.unsupported_reason(runtime)
            reason = None if guided is None else f"it needs guided backprop, but {guided}"
        return reason

    def plan(self, runtime: ModelRuntime, options: ExplainOptions, batch: int) -> Plan:
        reason = self.supported(runtime)
        if reason is not None:
            raise FailedPrecondition(
                f"explanation.method={self.name!r} cannot explain model {runtime.name!r}: {reason}"
            )
        if self.guided:
            backprop.check_name(options)
            chosen = backprop.canonical(options.backprop_modifier or backprop.GUIDED)
            if chosen != backprop.GUIDED:
                raise InvalidArgument(
                    f"explanation.backprop_modifier={options.backprop_modifier!r} does not apply "
                    f"to method {self.name!r}, which always uses {backprop.GUIDED!r}: leave it "
                    "empty"
                )
            plan = backprop.plan_gradient(
                runtime,
                self,
                replace(options, backprop_modifier=backprop.GUIDED),
                batch,
                with_wrt=False,
            )
        else:
            plan = common.plan_targets(runtime, self, options, batch)
        index = resolve_penultimate(runtime, options, plan.graph.targets, plan.graph.input_index)
        plan.graph = replace(plan.graph, penultimate=index)
        plan.resolved = replace(
            plan.resolved,
            penultimate_layer=runtime.model.layers[index].name,
            # A CAM sums the channel axis away; Guided Grad-CAM keeps the input's.
            channels_reduced=plan.resolved.channels_reduced if self.guided else True,
        )
        return plan

    def build(
        self, runtime: ModelRuntime, graph: Graph, param_specs: dict[str, tf.TensorSpec]
    ) -> DeviceFunction:
        assert graph.penultimate is not None  # set by plan
        # Grad-CAM's gradient is the ordinary one, even inside Guided Grad-CAM.
        model = backprop.explain_model(
            runtime, replace(graph, backprop_modifier=""), (graph.penultimate,)
        )
        guided_model = backprop.explain_model(runtime, graph) if self.guided else None
        n_targets = len(graph.targets)
        explained = graph.input_index
        plus_plus = self.name == GRADCAM_PLUS_PLUS

        def run(model: keras.Model, feed: Sequence[tf.Tensor]) -> list[tf.Tensor]:
            results = model(list(feed) if len(feed) > 1 else feed[0], training=False)
            return list(results) if isinstance(results, list | tuple) else [results]

        @tf.function(input_signature=[runtime.input_specs, param_specs])
        def cam(inputs: tuple[tf.Tensor, ...], params: Mapping[str, tf.Tensor]) -> Any:
            runtime.count_trace()
            feed = list(inputs)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                for t in feed:
                    if t.dtype.is_floating:
                        tape.watch(t)
                results = run(model, feed)
                scores = common.per_sample_score(results[:n_targets], params)
                total = tf.reduce_sum(scores)
            a = results[n_targets]
            g = tape.gradient(total, a)
            if g is None:
                g = tf.zeros_like(a)
            x = inputs[explained]
            raw = {ACTIVATIONS: tf.cast(a, tf.float32), CAM_GRADS: tf.cast(g, tf.float32)}
            if guided_model is not None:
                with tf.GradientTape(watch_accessed_variables=False) as guided_tape:
                    guided_tape.watch(x)
                    guided_feed = list(inputs)
                    guided_feed[explained] = x
                    guided = run(guided_model, guided_feed)
                    guided_score = tf.reduce_sum(
                        common.per_sample_score(guided[:n_targets], params)
                    )
                grads = guided_tape.gradient(guided_score, x)
                raw[GRADS] = tf.cast(grads if grads is not None else tf.zeros_like(x), tf.float32)
            else:
                size = tf.shape(x)[1:-1]
                raw[SIZE] = tf.tile(size[None], [tf.shape(x)[0], 1])
                if plus_plus:
                    raw[SCORES] = tf.cast(scores, tf.float32)
            return tuple(results[n_targets + 1 :]), raw

        return cam

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        a, g = raw[ACTIVATIONS], raw[CAM_GRADS]
        if self.guided:
            product = guided_product(len(a.shape))(raw[GRADS], a, g)
            return common.finish_gradient_maps(plan, product), {}
        p = plan.post
        maps = cam_maps(self.name, p.grad_modifiers, p.normalize, p.output_dtype, len(a.shape))
        scores = raw[SCORES] if SCORES in raw else tf.zeros(tf.shape(a)[:1], tf.float32)
        return dict(zip(p.grad_modifiers, maps(a, g, scores, raw[SIZE][0]), strict=True)), {}


class GradCam(CamMethod):
    name = GRADCAM


class GradCamPlusPlus(CamMethod):
    name = GRADCAM_PLUS_PLUS


class GuidedGradCam(CamMethod):
    name = GUIDED_GRADCAM
    default_grad_modifier = "absolute"
    guided = True
