"""Finding 1 of the hostile-traffic issue, against a real `salience serve` process:
one request could exhaust memory. A fully convolutional model with free spatial
axes, `smoothgrad` with `samples=128` on one 1×1024×1024×3 float32 input (12 MiB)
took the server from 2.8 GB to 15 GB of RSS in 15 s, since the caps bounded rows,
not rows × samples × pixels.

Now its cost (1 row × 128 evaluations × 3,145,728 elements = 402,653,184
element-evaluations) is over the default `max_request_cost` (2**28): it is refused
with INVALID_ARGUMENT before any device work, and the message says how many
samples would fit (85). The costliest request that is admitted at that size
(`samples=85`) is computed, and its peak RSS is printed (docs/bad-input.md quotes
it). A thread watches the server's RSS all along and kills it before it can put
the machine at risk (24 GiB shared).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from salience_client import SalienceClient, SalienceError
from tests.processes import ServerProcess, salience_serve

GIB = 1024**3
MIB = 1024**2
SIDE = 1024
COST_CAP = 2**28  # the default max_request_cost
ELEMENTS = SIDE * SIDE * 3
FITS = COST_CAP // ELEMENTS  # 85 samples at this size
KILL_AT = 8 * GIB  # the watcher stops the server past this RSS
REFUSED_GROWTH = 256 * MIB  # a refused request holds its 12 MiB input, not its work
ADMITTED_GROWTH = 4 * GIB  # the worst admitted request, with room for the allocator


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from tests.conftest import save_model

    root = tmp_path_factory.mktemp("cost-repo")
    keras.utils.set_random_seed(3)
    image = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    save_model(root, "fcn", keras.Model(image, keras.layers.Dense(3, name="logits")(h)))
    return root


class Watch:
    """Samples a server's RSS every few ms; kills it past KILL_AT."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.peak = server.rss_bytes()
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                rss = self.server.rss_bytes()
            except (FileNotFoundError, AssertionError):
                return  # the process is gone
            self.peak = max(self.peak, rss)
            if rss > KILL_AT:
                self.killed = True
                self.server.process.kill()
                return

    def reset(self) -> int:
        """Starts a new peak from the RSS now; returns it."""
        now = self.server.rss_bytes()
        self.peak = now
        return now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[tuple[ServerProcess, Watch]]:
    with salience_serve(repo) as server:
        watch = Watch(server)
        try:
            yield server, watch
        finally:
            watch.close()


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, SIDE, SIDE, 3), dtype=np.float32)


def counter(server: ServerProcess, name: str, **labels: str) -> float:
    """A series of the server's /metrics for model `fcn` (0 when it has none yet)."""
    wanted = [f'{k}="{v}"' for k, v in {"model": "fcn", **labels}.items()]
    for line in server.metrics().splitlines():
        if line.startswith(f"{name}{{") and all(w in line for w in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_smoothgrad_128_samples_on_a_megapixel_input_is_refused_at_once(
    served: tuple[ServerProcess, Watch],
) -> None:
    server, watch = served
    with SalienceClient(server.target, retry=None) as client:
        client.predict("fcn", image(0)[:, :64, :64])  # connection and first trace
        base = watch.reset()
        with pytest.raises(SalienceError) as caught:
            client.explain("fcn", image(1), method="smoothgrad", samples=128, timeout=120)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == (
        f"the smoothgrad request costs {128 * ELEMENTS} element-evaluations (1 rows × 128 "
        f"evaluations × {ELEMENTS} input elements per row), over the server's "
        f"max_request_cost={COST_CAP}: send fewer samples (at most {FITS} at this size), "
        "fewer rows or a smaller input"
    )
    # Refused before the device: no explain sample was computed, the cost is counted.
    assert counter(server, "salience_samples_total", kind="predict") >= 1
    assert counter(server, "salience_samples_total", kind="explain") == 0
    refused = counter(server, "salience_request_cost_refused_total", reason="over_cap")
    assert refused == 128 * ELEMENTS
    assert not watch.killed
    growth = watch.peak - base
    print(f"\nrefused smoothgrad samples=128 on 1x{SIDE}x{SIDE}x3: RSS +{growth / MIB:.0f} MiB")
    assert growth < REFUSED_GROWTH


def test_the_costliest_admitted_request_at_that_size_stays_bounded(
    served: tuple[ServerProcess, Watch],
) -> None:
    server, watch = served
    with SalienceClient(server.target, retry=None) as client:
        client.predict("fcn", image(0)[:, :64, :64])
        base = watch.reset()
        start = time.monotonic()
        result = client.explain(
            "fcn", image(2), method="smoothgrad", samples=FITS, seed=5, timeout=600
        )
        seconds = time.monotonic() - start
    assert not watch.killed, f"RSS passed {KILL_AT / GIB:g} GiB: the server was stopped"
    the_map = result.maps["absolute"]
    assert the_map.shape == (1, SIDE, SIDE)
    # Normalised per sample into [0, 1): gradients through a global average over a
    # megapixel are ~1e-7, so the min-max range is of the order of its epsilon.
    assert np.isfinite(the_map).all()
    assert the_map.min() == 0.0
    assert 0.5 < the_map.max() < 1.0
    assert the_map.std() > 0.01
    growth = watch.peak - base
    print(
        f"\nworst admitted: smoothgrad samples={FITS} on 1x{SIDE}x{SIDE}x3 "
        f"({FITS * ELEMENTS} element-evaluations): peak RSS {watch.peak / GIB:.2f} GiB, "
        f"+{growth / MIB:.0f} MiB over {base / GIB:.2f} GiB, in {seconds:.1f} s"
    )
    assert growth < ADMITTED_GROWTH
