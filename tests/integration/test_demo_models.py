"""`salience serve` without a repository serves the bundled demo models, and their
maps say something true about the images they explain."""

from __future__ import annotations

import numpy as np
import pytest

from salience_client import SalienceClient
from salience_server.demo.data import SHAPE_CLASSES, generate_roads, generate_shapes
from tests.conftest import RunningServer

EPS = 1e-7


@pytest.fixture(scope="module")
def client(demo_server: RunningServer) -> SalienceClient:
    return demo_server.client()


def test_bundled_models_are_served_by_default(client: SalienceClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"shapes", "shapes-spurious", "steering"}
    shapes = client.metadata("shapes")
    assert list(shapes.inputs[0].shape) == [-1, 64, 64, 3]
    assert list(shapes.outputs[0].shape) == [-1, len(SHAPE_CLASSES)]
    assert shapes.layers[-1].activation == "softmax"
    steering = client.metadata("steering")
    assert list(steering.outputs[0].shape) == [-1, 1]
    assert steering.layers[-1].activation == "tanh"


def test_shapes_maps_land_on_the_object(client: SalienceClient) -> None:
    data = generate_shapes(16, seed=2024_11)
    result = client.explain("shapes", data.images, layer=-1, filter_indices=[0])
    # Explain each image's own true class: one request per class present.
    energy_inside = []
    for label in np.unique(data.labels):
        rows = np.flatnonzero(data.labels == label)
        maps = client.explain("shapes", data.images[rows], filter_indices=[int(label)]).maps
        for row, saliency in zip(rows, maps["absolute"], strict=True):
            mask = data.masks[row]
            energy_inside.append(saliency[mask].sum() / saliency.sum() / mask.mean())
    assert result.predictions.shape == (16, len(SHAPE_CLASSES))
    # On average the map is several times denser on the object than elsewhere.
    assert float(np.median(energy_inside)) > 2.0


def test_steering_increase_decrease_maintain_from_one_request(client: SalienceClient) -> None:
    roads = generate_roads(3, seed=77)
    result = client.explain(
        "steering",
        roads.images,
        filter_indices=[0],
        grad_modifiers=["none", "negate", "small_values"],
    )
    raw = client.explain(
        "steering", roads.images, filter_indices=[0], grad_modifiers=["none"], normalize=False
    ).maps["none"]
    # All three maps come from the same gradient G (channels reduced by max of each
    # modified gradient), so each must equal its formula applied to G.
    np.testing.assert_allclose(result.maps["none"], normalized(raw), atol=1e-4)
    keep = client.explain(
        "steering",
        roads.images,
        filter_indices=[0],
        grad_modifiers=["none"],
        normalize=False,
        keepdims=True,
    ).maps["none"]
    np.testing.assert_allclose(result.maps["negate"], normalized((-keep).max(-1)), atol=1e-4)
    small = np.abs(1 / (keep.astype(np.float64) + EPS)).max(-1)
    np.testing.assert_allclose(result.maps["small_values"], normalized(small), atol=1e-4)
    assert result.resolved.objectives[0].used_logits is False  # tanh is not squashed away
    assert np.all(np.abs(result.predictions) <= 1)


def normalized(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.float64)
    axes = tuple(range(1, s.ndim))
    low, high = s.min(axes, keepdims=True), s.max(axes, keepdims=True)
    return (s - low) / (high - low + EPS)


def test_demo_map_is_the_same_alone_or_in_a_batch_of_8(client: SalienceClient) -> None:
    data = generate_shapes(8, seed=5)
    together = client.explain("shapes", data.images, filter_indices=[1]).maps["absolute"]
    for i in (0, 7):
        alone = client.explain("shapes", data.images[i : i + 1], filter_indices=[1])
        np.testing.assert_allclose(alone.maps["absolute"][0], together[i], atol=1e-5)
