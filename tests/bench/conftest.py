"""What the benchmarks share: one repository with a MobileNetV2-sized model (random
weights, 224x224) and the bundled `shapes` demo model, built once per run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from salience_server.demo import bundled_repository

    root = tmp_path_factory.mktemp("bench-repo")
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=1000)
    (root / "mobilenet" / "1").mkdir(parents=True)
    model.save(root / "mobilenet" / "1" / "model.keras")
    shutil.copytree(bundled_repository() / "shapes", root / "shapes")
    return root
