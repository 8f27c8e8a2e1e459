"""Fixtures of the image tests (marker `image`, run by `make image-test`): the tests'
own Docker engine and the image built in it, once for the whole run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.deploy.engine import (
    ROOT,
    Engine,
    EngineUnavailable,
    docker_engine,
    run_checked,
)

IMAGE = "salience:0.1.0"
BUILD_STAGE = "salience-test/build-stage:cache"
BUILT_LINE = re.compile(r"^built (\S+) on (\S+) in ([0-9.]+) s$", re.MULTILINE)


@dataclass(frozen=True)
class BuiltImage:
    name: str
    base: str
    build_seconds: float
    size_bytes: int


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    try:
        with docker_engine() as running:
            yield running
    except EngineUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must build and run the image, and no container engine runs: {err}")
        pytest.skip(f"no container engine can run on this machine: {err}")


def largest_layers(engine: Engine, image: str, count: int = 3) -> list[tuple[int, str]]:
    """(bytes, the instruction that made it) of the image's largest layers."""
    lines = engine.docker(
        "history", "--human=false", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image
    ).stdout.splitlines()
    layers = []
    for line in lines:
        size, _, created_by = line.partition("\t")
        step = created_by.removeprefix("/bin/sh -c ").removeprefix("#(nop) ").strip()
        layers.append((int(size), step or "(the base image)"))
    return sorted(layers, reverse=True)[:count]


def largest_packages(engine: Engine, image: str, count: int = 4) -> str:
    """The venv's largest installed packages, in MiB (what makes its layer large)."""
    script = (
        "cd /opt/salience/lib/python3*/site-packages && du -sm -- * | sort -rn | "
        f"head -n {count} | awk '{{printf \"%s %s MiB, \", $2, $1}}'"
    )
    found = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script
    ).stdout
    return found.strip().rstrip(",")


@pytest.fixture(scope="session")
def image(engine: Engine) -> BuiltImage:
    """The image, built by `make image`'s script in the tests' engine; builds reach
    the package registries over the host's network (the engine has no default bridge).
    """
    script = str(ROOT / "scripts" / "build-image.sh")
    seconds = 0.0
    cached = 0
    # The build stage first, under a tag of its own: untagged, it would be a dangling
    # image, which the engine's clean-up prunes, and with it the cache of its install
    # (TensorFlow). Then the image, whose build stage is that cache.
    for name, options in ((BUILD_STAGE, ("--target", "build")), (IMAGE, ())):
        result = run_checked(
            [script, name, "--network", "host", *options], engine.env, timeout=1800
        )
        found = BUILT_LINE.search(result.stdout)
        assert found is not None, result.stdout[-2000:]
        assert found.group(1) == name
        seconds += float(found.group(3))
        cached += result.stdout.count("Using cache")
    (details,) = engine.inspect(IMAGE)
    built = BuiltImage(IMAGE, found.group(2), seconds, details["Size"])
    layers = ", ".join(
        f"{size / 2**20:.0f} MiB {step[:70]}" for size, step in largest_layers(engine, IMAGE)
    )
    print(
        f"\nimage: {IMAGE} on {built.base}: built in {built.build_seconds:.1f} s, "
        f"{built.size_bytes / 1e9:.2f} GB ({built.size_bytes / 2**20:.0f} MiB); "
        f"{cached} steps taken from the build cache"
        f"\nimage: largest layers: {layers}"
        f"\nimage: largest packages in the venv: {largest_packages(engine, IMAGE)}"
    )
    return built
