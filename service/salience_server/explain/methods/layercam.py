"""Layer-CAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation
Maps for Localization"): Grad-CAM with a weight per activation element instead of
one per channel.

With `A` the CAM layer's output and `G = ∂s/∂A` (the ordinary gradient of the
per-sample score, logits by default, as for Grad-CAM), and `m` the request's grad
modifier (default `relu`, the paper's positive gradients):

    M = ReLU(Σ_k m(G)_k ⊙ A_k)

element by element over the spatial positions, then resized to the input's spatial
size and normalised per sample as every CAM is. This is tf-keras-vis's `Layercam`
(its `gradient_modifier` is our grad modifier). The CAM layer is chosen as for
Grad-CAM (`penultimate_layer`, default the last layer with spatial extent > 1×1);
Layer-CAM's point is that earlier, finer layers give useful maps too.

The device function is Grad-CAM's (`A` and `G`); only the finish differs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import tensorflow as tf

from salience_server.explain import modifiers
from salience_server.explain.engine import RawTensors
from salience_server.explain.methods import cam
from salience_server.explain.options import LAYERCAM
from salience_server.explain.plan import Plan


def layercam(a: tf.Tensor, gc: tf.Tensor) -> tf.Tensor:
    """`ReLU(Σ_k Gc_k ⊙ A_k)`, shape (B, *spatial)."""
    return tf.nn.relu(tf.reduce_sum(a * gc, axis=-1))


@lru_cache(maxsize=256)
def layercam_maps(
    grad_modifiers: tuple[str, ...], normalize: bool, output_dtype: str, rank: int
) -> Callable[..., tuple[tf.Tensor, ...]]:
    """A compiled function from (A, ∂s/∂A, input spatial size) to one map per grad
    modifier; traced once per option set and activation rank.
    """
    spatial_rank = rank - 2
    spec = tf.TensorSpec([None] * rank, tf.float32)

    @tf.function(
        input_signature=[spec, spec, tf.TensorSpec([spatial_rank], tf.int32)],
        reduce_retracing=True,
    )
    def maps(a: tf.Tensor, g: tf.Tensor, size: tf.Tensor) -> Any:
        out = []
        for name in grad_modifiers:
            m = cam.resize(layercam(a, modifiers.GRAD_MODIFIERS[name](g)), size, spatial_rank)
            if normalize:
                low = cam.per_sample_reduce(tf.reduce_min, m)
                high = cam.per_sample_reduce(tf.reduce_max, m)
                m = (m - low) / (high - low + modifiers.EPSILON)
            out.append(cam.quantise(m, output_dtype))
        return tuple(out)

    return maps


class LayerCam(cam.CamMethod):
    name = LAYERCAM
    default_grad_modifier = "relu"

    def finish(
        self, plan: Plan, raw: RawTensors
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        a, g = raw[cam.ACTIVATIONS], raw[cam.CAM_GRADS]
        p = plan.post
        maps = layercam_maps(p.grad_modifiers, p.normalize, p.output_dtype, len(a.shape))
        return dict(zip(p.grad_modifiers, maps(a, g, raw[cam.SIZE][0]), strict=True)), {}
