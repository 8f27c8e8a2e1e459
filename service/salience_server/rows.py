"""The batcher's row bookkeeping on device tensors: gathers, splits and joins of
batch-first tensors (or numpy arrays), so that the rows of a device call stay on
the device until each request's finish copies its own maps to the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def gather_rows(tensors: Any, index: np.ndarray) -> Any:
    """The rows `index` of each batch-first tensor of a sequence or mapping."""
    if isinstance(tensors, Mapping):
        return {name: tf.gather(t, index) for name, t in tensors.items()}
    return [
        np.asarray(t)[index] if isinstance(t, np.ndarray) else tf.gather(t, index) for t in tensors
    ]


def split_rows(tensor: Any, sizes: Sequence[int]) -> list[Any]:
    """Consecutive blocks of `sizes` rows of a batch-first device tensor or array."""
    if len(sizes) == 1:
        return [tensor]
    if isinstance(tensor, np.ndarray):
        ends = np.cumsum(sizes)
        return [tensor[end - size : end] for size, end in zip(sizes, ends, strict=True)]
    return list(tf.split(tensor, list(sizes), axis=0))


def concat_rows(parts: Sequence[Any]) -> Any:
    """Row blocks (of one request split across device calls) joined back in order."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return tf.concat(list(parts), axis=0)
