"""Model-parameter randomisation, the sanity check of Adebayo et al. (2018).

A method whose map barely changes when the model's weights are destroyed does not
explain the model. The check compares the maps of the trained model with those of
copies in which the top `k` weighted layers (layers with trainable weights, counted
from the output down: the "cascading" randomisation) are re-initialised, for
k = 1, 2, ... A request asks for it with `Explanation.randomization` (layers, seed).

Why the server does it: the maps must come from the same methods, options, device
and batching as every other map, and the client must not need TensorFlow to
re-initialise weights. The copy is a whole `ModelRuntime` (same layers, same
indices, same preprocessing), so every method explains it unchanged: the runtime
plans a request on the trained model (targets and layers resolve by index, equal
in the copy) and builds the graph's device function on the copy. Requests for the
same (layers, seed) share a graph and are batched together on the model's batcher.

Each copy is built once per (model version, layers, seed) and kept in a small
least-recently-used cache of `CACHE_SIZE` copies per version, with the compiled
functions built on it; the served model's weights are never touched.

Weights are re-initialised with each layer's own initializers (`kernel_initializer`,
`bias_initializer`, ...; Glorot uniform for a weight without one), each seeded from
(seed, layer index), so a (layers, seed) pair always gives the same copy, and copy
k+1 equals copy k except for the one more layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from salience_server.errors import FailedPrecondition, InvalidArgument
from salience_server.explain.options import ExplainOptions
from salience_server.explain.plan import Graph

if TYPE_CHECKING:
    from salience_server.runtime import ModelRuntime

# Randomised copies kept per model version; a cascade over a deep model asks for
# one per depth, but an audit walks the depths in order, so a few suffice.
CACHE_SIZE = 4
_CACHE_KEY = "randomized-copies"


def weighted_layers(model: keras.Model) -> list[int]:
    """Indices of the model's layers that have trainable weights, output first.

    A nested model counts as one layer (all its weights are re-initialised together).
    """
    return [i for i in reversed(range(len(model.layers))) if model.layers[i].trainable_weights]


def check(runtime: ModelRuntime, options: ExplainOptions) -> None:
    """Refuses a randomisation the model cannot have, before any work is queued."""
    k = options.randomize_layers
    if not k:
        return
    if not runtime.has_layers:
        raise FailedPrecondition(
            f"explanation.randomization needs a Keras model: model {runtime.name!r} is a "
            "SavedModel signature without layers to re-initialise; leave it unset"
        )
    names = [runtime.model.layers[i].name for i in weighted_layers(runtime.model)]
    if k > len(names):
        raise InvalidArgument(
            f"explanation.randomization.layers={k} is over the {len(names)} weighted layers of "
            f"model {runtime.name!r} ({', '.join(names)}, from the output down): use "
            f"1..{len(names)}, or 0 for the trained model"
        )


def layer_names(runtime: ModelRuntime, layers: int) -> tuple[str, ...]:
    """The names of the `layers` weighted layers re-initialised, output first."""
    return tuple(runtime.model.layers[i].name for i in weighted_layers(runtime.model)[:layers])


def _layer_seed(seed: int, index: int) -> int:
    # Independent streams per layer, so copy k+1 only adds one re-initialised layer.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def _initializer(layer: keras.layers.Layer, variable: Any, seed: int) -> Any:
    """The layer's own initializer of `variable`, re-seeded (Glorot when it has none)."""
    short = variable.path.rsplit("/", 1)[-1]
    init = getattr(layer, f"{short}_initializer", None)
    if init is None:
        return keras.initializers.GlorotUniform(seed=seed)
    init = keras.initializers.get(init)
    config = init.get_config()
    if "seed" in config:
        config["seed"] = seed
    return init.__class__.from_config(config)


def randomized_copy(model: keras.Model, layers: int, seed: int) -> keras.Model:
    """A copy of `model` with its top `layers` weighted layers re-initialised."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for index in weighted_layers(copy)[:layers]:
        layer = copy.layers[index]
        for j, variable in enumerate(layer.trainable_weights):
            init = _initializer(layer, variable, _layer_seed(seed, index * 1000 + j))
            variable.assign(init(tuple(variable.shape), dtype=variable.dtype))
    return copy


def copy_runtime(runtime: ModelRuntime, layers: int, seed: int) -> ModelRuntime:
    """The runtime of the randomised copy, built once per (layers, seed) and cached.

    Call inside `runtime.exclusive()`. Evicting a copy also drops the parent's compiled
    functions built on it, so the bound holds for the memory they keep alive.
    """
    cache: OrderedDict[tuple[int, int], ModelRuntime] = runtime.derive(_CACHE_KEY, OrderedDict)
    key = (layers, seed)
    twin = cache.get(key)
    if twin is not None:
        cache.move_to_end(key)
        return twin
    model = randomized_copy(runtime.model, layers, seed)
    twin = runtime.with_model(model)
    cache[key] = twin
    while len(cache) > CACHE_SIZE:
        evicted, _ = cache.popitem(last=False)

        def stale(graph: Graph, gone: tuple[int, int] = evicted) -> bool:
            return graph.randomize == gone

        runtime.forget_functions(stale)
    return twin
