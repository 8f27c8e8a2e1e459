"""The salience client: a blocking and an asyncio gRPC client (numpy in, numpy out),
overlay rendering, and the `salience` command line. It never imports TensorFlow.
"""

from salience_client.aio import AsyncSalienceClient
from salience_client.channel import DEFAULT, TLS, Keepalive, RetryPolicy
from salience_client.client import SalienceClient
from salience_client.results import (
    Explanation,
    Objective,
    Prediction,
    ResolvedExplanation,
    ResolvedObjective,
    SalienceError,
)

__all__ = [
    "DEFAULT",
    "TLS",
    "AsyncSalienceClient",
    "Explanation",
    "Keepalive",
    "Objective",
    "Prediction",
    "ResolvedExplanation",
    "ResolvedObjective",
    "RetryPolicy",
    "SalienceClient",
    "SalienceError",
]
