"""Scores of many modified copies of every sample, as batched forward passes in
bounded chunks on the device (Score-CAM's masked inputs, occlusion's occluded ones).

The gradient-free methods score `K` copies of each of the `B` samples of a batch:
`B·K` forward passes, run as batches of the model, never one by one, in chunks of
about `chunk_size` rows (a request option, `options.DEFAULT_CHUNK_SIZE` by
default) so that device memory stays bounded whatever `K` and `B` are: a chunk
holds `max(1, chunk_size // B)` copies of every sample. The chunks run inside one
`tf.while_loop` of the compiled function, and each chunk's scores are folded into
per-sample accumulators straight away (`Fold`), so the `B·K` copies never exist at
once. As in `copies` (the gradient methods' counterpart), a copy is a function of
its sample's own data and params and its copy index alone, so that a result does
not depend on what the sample was batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from salience_server.explain import common
from salience_server.explain.methods import copies

# The per-sample param holding a request's rows per chunk. Requests batched together
# may ask for different sizes: the call uses the smallest, so none gets more memory
# than it asked for (results do not depend on it beyond rounding).
CHUNK = "chunk_size"

Make = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
"""(explained input rows, sample index per row, copy index per row) → copy rows."""

Fold = Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]
"""(float32 scores shaped (copies, B), copy indices (copies,)) → per-sample terms
shaped (B, ...) to add to the accumulators of the same names."""


def chunk_rows(params: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The call's rows per chunk: the smallest any of its requests asked for."""
    return tf.reduce_min(params[CHUNK])


def fold_over_copies(
    model: keras.Model,
    inputs: Sequence[tf.Tensor],
    explained: int,
    n_targets: int,
    params: Mapping[str, tf.Tensor],
    count: tf.Tensor,
    make: Make,
    fold: Fold,
    totals: dict[str, tf.Tensor],
) -> dict[str, tf.Tensor]:
    """Adds `fold(s(copy))` over `count` copies of every sample to `totals`.

    `model` is an explain model (`[*targets, *outputs]`), `params` holds the
    per-sample objective weights and `CHUNK`, `totals` the per-sample accumulators.
    """
    x = inputs[explained]
    batch = tf.shape(x)[0]
    per_chunk = tf.maximum(1, chunk_rows(params) // tf.maximum(batch, 1))
    samples = tf.range(batch)
    weights = copies.score_weights(params)
    keys = sorted(totals)

    def body(start: tf.Tensor, *acc: tf.Tensor) -> tuple[tf.Tensor, ...]:
        n = tf.minimum(per_chunk, count - start)
        copy_index = start + tf.range(n)
        # Copy-major rows: row i*B + b is copy start+i of sample b.
        row_copy = tf.repeat(copy_index, batch)
        row_sample = tf.tile(samples, [n])
        feed = [tf.gather(t, row_sample) for t in inputs]
        feed[explained] = make(feed[explained], row_sample, row_copy)
        row_weights = {key: tf.gather(w, row_sample) for key, w in weights.items()}
        results = copies.call_model(model, feed)
        scores = common.per_sample_score(results[:n_targets], row_weights)
        added = fold(tf.reshape(scores, [n, batch]), copy_index)
        return (start + n, *(a + added[key] for a, key in zip(acc, keys, strict=True)))

    result = tf.while_loop(
        lambda start, *_: start < count,
        body,
        (tf.constant(0), *(totals[key] for key in keys)),
        shape_invariants=(
            tf.TensorShape([]),
            *(tf.TensorShape([None, *totals[key].shape[1:]]) for key in keys),
        ),
    )
    return dict(zip(keys, result[1:], strict=True))
