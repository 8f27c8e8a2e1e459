"""Demo models bundled with the service.

Two small Keras models trained on procedurally generated data: a shape classifier
(``shapes``) and a PilotNet-style steering regressor (``steering``). They live in a
model repository laid out as ``<name>/<version>/model.keras`` so the server can serve
them without any external download; ``python -m salience_server.demo.train`` rebuilds
them deterministically.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"


def bundled_repository() -> Path:
    """Return the directory of the model repository shipped with the package."""
    return MODELS_DIR
