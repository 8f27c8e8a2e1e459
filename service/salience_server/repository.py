"""The model repository: `DIR/<model>/<version>/model.keras`, every version loaded.

A version is a positive integer directory; the highest is served when a request
names none. Names are checked before any path is built from them, so a request can
never reach outside the repository.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from salience_server.errors import NotFound, allowed
from salience_server.runtime import ModelRuntime

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")


class RepositoryError(RuntimeError):
    """The repository holds nothing that can be served."""


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Every `<model>/<version>/model.keras` under root, by model and version.

    Entries that do not fit the layout are skipped with a warning naming them.
    """
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not MODEL_NAME.match(model_dir.name):
            log.warning("skipping %s: not a valid model name", model_dir)
            continue
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if not VERSION_DIR.match(version_dir.name):
                log.warning("skipping %s: a version is a positive integer", version_dir)
                continue
            model_file = version_dir / MODEL_FILE
            if not model_file.is_file():
                log.warning("skipping %s: no %s in it", version_dir, MODEL_FILE)
                continue
            found.setdefault(model_dir.name, {})[int(version_dir.name)] = model_file
    return found


class ModelRepository:
    """Loaded models by name and version."""

    def __init__(self, models: dict[str, dict[int, ModelRuntime]]) -> None:
        self._models = models

    @classmethod
    def load(
        cls,
        root: Path,
        loader: Callable[[str, int, Path], ModelRuntime] = ModelRuntime.load,
        warm_up: bool = True,
    ) -> ModelRepository:
        """Loads (and warms up) every version found under root; blocking."""
        found = scan(root)
        if not found:
            raise RepositoryError(
                f"no model found under {root}: expected {root}/<model>/<version>/{MODEL_FILE}"
            )
        models: dict[str, dict[int, ModelRuntime]] = {}
        for name, versions in found.items():
            for version, path in sorted(versions.items()):
                log.info("loading model %s version %d from %s", name, version, path)
                runtime = loader(name, version, path)
                if warm_up:
                    runtime.warm_up()
                models.setdefault(name, {})[version] = runtime
        return cls(models)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models[name]) if name in self._models else []

    def get(self, name: str, version: int = 0) -> ModelRuntime:
        """The runtime for a model version (0 = highest); NOT_FOUND names what exists."""
        versions = self._models.get(name)
        if versions is None:
            raise NotFound(
                f"model.name={name!r} is not served: choose one of {allowed(self.names())}"
            )
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise NotFound(
                f"model.version={version} of model {name!r} is not served: "
                f"choose one of {allowed(sorted(versions))} (or 0 for the highest)"
            )
        return versions[version]

    def close(self) -> None:
        """Drops every model, so its weights can be freed."""
        self._models.clear()
