"""An example plugin: one operator-defined grad modifier and one backprop modifier.

Serve with `salience serve --plugins salience_server.demo.example_plugin` (or
`SALIENCE_PLUGINS=salience_server.demo.example_plugin`); requests can then ask for
`grad_modifiers=["square"]` and `backprop_modifier="identity"`, and every model's
metadata lists both.

- `square`: `G²`, the squared gradient (PAIR's SmoothGrad-squared uses it), an
  unsigned map that stresses the largest gradients more than `absolute`.
- `identity`: every ReLU passes the upstream gradient down unchanged, `g`, as if it
  were the identity: the gradient of the model with its ReLUs linearised.
"""

from __future__ import annotations

import tensorflow as tf

from salience_server.plugins import register_backprop_modifier, register_grad_modifier


def square(g: tf.Tensor) -> tf.Tensor:
    """`G²`."""
    return tf.square(g)


def identity(y: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """`g`, whatever the ReLU's output."""
    return tf.identity(g)


register_grad_modifier("square", square)
register_backprop_modifier("identity", identity)
