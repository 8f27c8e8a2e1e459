"""The salience client: a synchronous gRPC client (numpy in, numpy out), overlay
rendering, and the `salience` command line. It never imports TensorFlow.
"""

from salience_client.client import (
    Explanation,
    Objective,
    Prediction,
    SalienceClient,
    SalienceError,
)

__all__ = ["Explanation", "Objective", "Prediction", "SalienceClient", "SalienceError"]
