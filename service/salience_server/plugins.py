"""Operator-defined grad and backprop modifiers, registered by plugin modules.

The operator names Python modules in the `plugins` setting; the server imports each
at start-up, before it loads any model. A plugin module calls, when imported:

    from salience_server.plugins import register_backprop_modifier, register_grad_modifier

    register_grad_modifier("square", lambda g: g * g)
    register_backprop_modifier("identity", lambda y, g: g)

- `register_grad_modifier(name, fn)`: `fn(G)` is an element-wise TensorFlow function
  of the raw gradient (any shape, float32), applied before the channel reduction and
  normalisation like the built-in modifiers; requests name it in `grad_modifiers`.
- `register_backprop_modifier(name, grad_fn)`: `grad_fn(y, g)` is the gradient a
  ReLU passes down, from its output `y` (a unit saturated at a `max_value` is passed
  as 0, inactive) and the gradient `g` arriving from above; requests name it in
  `backprop_modifier`, on the models the built-in modifiers support.

Both are traced into the compiled functions, so they must be TensorFlow ops (no
numpy, no Python side effects). Names are lowercase words (`[a-z][a-z0-9_+-]*`)
and may not clash with a built-in name or another plugin's; every function is
tried on a small tensor when it is registered. Any failure raises PluginError,
which stops start-up with the reason. Registered names are listed in every
model's metadata. Requests only ever *name* a modifier: code comes from the
operator's plugin modules, never from a request.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence

import tensorflow as tf

from salience_server.explain import backprop, catalog, modifiers

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z][a-z0-9_+-]{0,63}$")

# The names built into the server, fixed before any plugin can add one.
BUILT_IN_GRAD_MODIFIERS = frozenset(modifiers.GRAD_MODIFIERS)
BUILT_IN_BACKPROP_MODIFIERS = frozenset(backprop.names())

_PROBE = [[-2.0, -0.5, 0.0, 0.5, 2.0]]


class PluginError(RuntimeError):
    """A plugin module cannot be loaded, or registers something the server refuses."""


def _check_name(kind: str, name: str, built_in: frozenset[str], taken: Sequence[str]) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise PluginError(
            f"{kind} name {name!r} is not allowed: use a lowercase word matching {NAME.pattern}"
        )
    if name in built_in:
        raise PluginError(f"{kind} {name!r} clashes with the built-in {kind} of that name")
    if name in taken:
        raise PluginError(f"{kind} {name!r} is registered twice")


def _probe(kind: str, name: str, fn: Callable[..., tf.Tensor], *args: tf.Tensor) -> None:
    """Runs a new modifier once on a small tensor, so a broken one stops start-up."""
    try:
        out = tf.convert_to_tensor(fn(*args))
    except Exception as err:
        raise PluginError(f"{kind} {name!r} fails on a test tensor: {err}") from err
    if tuple(out.shape) != tuple(args[-1].shape) or not out.dtype.is_floating:
        raise PluginError(
            f"{kind} {name!r} must return a floating-point tensor shaped like its input; "
            f"it returned {out.dtype.name} of shape {tuple(out.shape)}"
        )


def register_grad_modifier(name: str, fn: Callable[[tf.Tensor], tf.Tensor]) -> None:
    """Adds an element-wise grad modifier `fn(G)` under `name`."""
    _check_name(
        "grad modifier",
        name,
        BUILT_IN_GRAD_MODIFIERS,
        [n for n in modifiers.GRAD_MODIFIERS if n not in BUILT_IN_GRAD_MODIFIERS],
    )
    if not callable(fn):
        raise PluginError(f"grad modifier {name!r} is not a function")
    _probe("grad modifier", name, fn, tf.constant(_PROBE))
    modifiers.GRAD_MODIFIERS[name] = fn
    catalog.add_grad_modifier(name)
    log.info("registered grad modifier %r", name)


def register_backprop_modifier(name: str, grad_fn: backprop.BackpropRule) -> None:
    """Adds a backprop modifier: `grad_fn(y, g)` is what a ReLU passes down."""
    _check_name(
        "backprop modifier",
        name,
        BUILT_IN_BACKPROP_MODIFIERS,
        [n for n in backprop.names() if n not in BUILT_IN_BACKPROP_MODIFIERS],
    )
    if not callable(grad_fn):
        raise PluginError(f"backprop modifier {name!r} is not a function")
    probe = tf.constant(_PROBE)
    _probe("backprop modifier", name, grad_fn, tf.nn.relu(probe), probe)
    backprop.BACKPROP_MODIFIERS[name] = grad_fn
    log.info("registered backprop modifier %r", name)


def load_plugins(names: Sequence[str]) -> None:
    """Imports every plugin module (once per process; importing registers its modifiers)."""
    for name in names:
        try:
            importlib.import_module(name)
        except PluginError as err:
            raise PluginError(f"plugins: module {name!r} was refused: {err}") from err
        except Exception as err:
            raise PluginError(
                f"plugins: module {name!r} cannot be loaded: {err.__class__.__name__}: {err}"
            ) from err
        log.info("loaded plugin module %s", name)
