"""The salience server: serves Keras models with their predictions and saliency maps.

Layout: `settings` (configuration), `app` (gRPC wiring and shutdown), `servicer` and
`convert` (the thin RPC layer), `core` (protocol-neutral request handling),
`repository` and `runtime` (models and their compiled functions), `explain` (the
explanation methods), `metrics`, `errors`, and `demo` (the bundled models).
"""

import os

# TensorFlow's C++ start-up chatter is noise in a server log; a caller may still
# raise it by setting the variable before importing us.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
