"""Gradients at many modified copies of every sample, in bounded chunks on the device.

SmoothGrad (noisy copies) and Integrated Gradients (points on a straight path)
both need `∂s/∂x` at `K` modified copies of each of the `B` samples of a batch.
The `B·K` copies run as batches of the model, never one by one, but in chunks of
about `CHUNK_ROWS` rows and `CHUNK_ELEMENTS` input elements, so that device memory
stays bounded whatever `K`, `B` and the input size are: a chunk holds
`max(1, min(CHUNK_ROWS // B, CHUNK_ELEMENTS // (B · elements per sample)))` copies
of every sample. The chunks
run inside one `tf.while_loop` of the compiled function, and each chunk's
gradients are folded into per-sample accumulators straight away, so the `B·K`
per-copy gradients never exist at once.

What a copy is (`Perturb`) and how its gradient is folded in (`Contribute`) belong
to the method. For every row of a chunk they get the index of its sample (only to
gather that sample's own params) and of its copy: a copy must be a function of the
sample's own data and params and the copy index alone, never of the sample's
position in the merged batch, so that a result does not depend on what the sample
was batched with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from salience_server.explain import common
from salience_server.explain.engine import per_sample
from salience_server.explain.plan import COPIES, Plan

# Rows (copies x samples) of one chunk. A 224x224 ResNet-50 backward pass over
# 128 rows needs a few GiB; larger batches only amortise kernel launches further.
CHUNK_ROWS = 128
# Input elements of one chunk: 128 rows of 224x224x3, so inputs up to that size
# chunk by rows as before, and larger ones (a free-spatial model fed 1024x1024)
# take fewer copies a chunk rather than proportionally more memory.
CHUNK_ELEMENTS = CHUNK_ROWS * 224 * 224 * 3

# COPIES, the per-sample param holding a request's count of copies (samples, or
# steps + 1 points), is a tensor, so that every count runs in one traced graph.
# Requests share a device call only with equal counts (`Plan.share`).

Perturb = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
"""(explained input rows, sample index per row, copy index per row) → copy rows."""

Contribute = Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]
"""(float32 gradients shaped (copies, B, ...), copy indices (copies,)) → per-sample
terms shaped (B, ...) to add to the accumulators of the same names."""


def call_model(model: keras.Model, feed: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """The explain model's outputs as a list, for one or several inputs."""
    results = model(list(feed) if len(feed) > 1 else feed[0], training=False)
    return list(results) if isinstance(results, list | tuple) else [results]


def score_weights(params: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The per-sample objective weights among a function's params."""
    return {key: value for key, value in params.items() if key.startswith(common.WEIGHTS)}


def sum_over_copies(
    model: keras.Model,
    inputs: Sequence[tf.Tensor],
    explained: int,
    n_targets: int,
    params: Mapping[str, tf.Tensor],
    copies: int | tf.Tensor,
    perturb: Perturb,
    contribute: Contribute,
    totals: dict[str, tf.Tensor],
    static_chunks: bool = False,
) -> dict[str, tf.Tensor]:
    """Adds `contribute(∂s/∂copy)` over `copies` copies of every sample to `totals`.

    `model` is an explain model (`[*targets, *outputs]`), `params` holds the
    per-sample objective weights, `totals` the per-sample accumulators (B, ...).
    With `static_chunks` (for XLA, which compiles only shapes it knows when it
    compiles) every chunk holds the same number of copies, the largest divisor of
    `copies` that fits, so no chunk's shape depends on the loop; `copies` must then
    be a Python int (XLA graphs are traced per count). Otherwise it may be a scalar
    tensor (`copy_count`).
    """
    x = inputs[explained]
    batch = tf.shape(x)[0]
    by_rows = CHUNK_ROWS // tf.maximum(batch, 1)
    # int64: a batch of large inputs can pass 2**31 elements.
    by_elements = CHUNK_ELEMENTS // tf.maximum(tf.size(x, out_type=tf.int64), 1)
    per_chunk = tf.maximum(1, tf.minimum(by_rows, tf.cast(by_elements, tf.int32)))
    if static_chunks:
        assert isinstance(copies, int), "static chunks need a count known when traced"
        divisors = tf.constant([d for d in range(1, copies + 1) if copies % d == 0])
        per_chunk = tf.reduce_max(tf.where(divisors <= per_chunk, divisors, 1))
    samples = tf.range(batch)
    weights = score_weights(params)
    keys = sorted(totals)

    def body(start: tf.Tensor, *acc: tf.Tensor) -> tuple[tf.Tensor, ...]:
        count = per_chunk if static_chunks else tf.minimum(per_chunk, copies - start)
        copy_index = start + tf.range(count)
        # Copy-major rows: row i*B + b is copy start+i of sample b.
        row_copy = tf.repeat(copy_index, batch)
        row_sample = tf.tile(samples, [count])
        feed = [tf.gather(t, row_sample) for t in inputs]
        rows = perturb(feed[explained], row_sample, row_copy)
        row_weights = {key: tf.gather(w, row_sample) for key, w in weights.items()}
        with tf.GradientTape() as tape:
            tape.watch(rows)
            feed[explained] = rows
            results = call_model(model, feed)
            score = tf.reduce_sum(common.per_sample_score(results[:n_targets], row_weights))
        grads = tape.gradient(score, rows)
        if grads is None:
            # The score does not depend on this input at all: its gradient is zero.
            grads = tf.zeros_like(rows)
        grads = tf.cast(grads, tf.float32)
        shaped = tf.reshape(grads, tf.concat([[count, batch], tf.shape(grads)[1:]], axis=0))
        shaped.set_shape([None, None, *grads.shape[1:]])
        added = contribute(shaped, copy_index)
        return (start + count, *(a + added[key] for a, key in zip(acc, keys, strict=True)))

    result = tf.while_loop(
        lambda start, *_: start < copies,
        body,
        (tf.constant(0), *(totals[key] for key in keys)),
        shape_invariants=(
            tf.TensorShape([]),
            *(tf.TensorShape([None, *totals[key].shape[1:]]) for key in keys),
        ),
    )
    return dict(zip(keys, result[1:], strict=True))


def plan_count(
    plan: Plan, field: Literal["samples", "steps"], count: int, copies: int, xla: bool
) -> None:
    """Gives a plan its count (`field`: "samples" or "steps") as the per-sample
    `COPIES` param (`copies` copies of each sample), and keeps it out of device calls
    of other counts (`Plan.share`). The graph key holds the count only under XLA,
    which compiles chunk shapes it must know (a graph per count); elsewhere it is a
    tensor argument, one trace for every count.
    """
    plan.params[COPIES] = per_sample(np.array(copies, np.int32), plan.batch)
    plan.share = (count,)
    if xla and field == "samples":
        plan.graph = dataclasses.replace(plan.graph, samples=count)
    elif xla:
        plan.graph = dataclasses.replace(plan.graph, steps=count)


def copy_count(static: int, params: Mapping[str, tf.Tensor]) -> int | tf.Tensor:
    """A graph's count of copies: its static count when it was traced per count (XLA),
    else the call's `COPIES` param (equal for every sample of a call).
    """
    return static if static else tf.reduce_max(params[COPIES])


def zeros_like_float(x: tf.Tensor) -> tf.Tensor:
    """A float32 accumulator shaped like `x` (batch first)."""
    return tf.zeros_like(x, dtype=tf.float32)
