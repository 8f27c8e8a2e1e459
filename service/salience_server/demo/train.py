"""Train the bundled demo models from procedurally generated data.

Usage::

    python -m salience_server.demo.train [--out DIR] [--only shapes|shapes-spurious|steering]

Everything is seeded, so a rerun on the same software stack reproduces the models up
to floating-point scheduling noise. Each model is evaluated on a held-out set drawn
with a seed that training never sees, and the figures go to ``metrics.json`` next to
the models so that the tests and the docs can quote them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from salience_server.demo import MODELS_DIR
from salience_server.demo.data import (
    ROAD_SHAPE,
    SHAPE_CLASSES,
    SHAPE_IMAGE_SHAPE,
    generate_cued_shapes,
    generate_roads,
    generate_shapes,
)

MODEL_VERSION = "1"
MODEL_FILENAME = "model.keras"
METRICS_FILENAME = "metrics.json"

KERAS_SEED = 20240611

SHAPES_TRAIN_SEED = 1
SHAPES_EVAL_SEED = 2
SHAPES_TRAIN_SAMPLES = 40_000
SHAPES_EVAL_SAMPLES = 2_000
SHAPES_EPOCHS = 12
SHAPES_BATCH = 64

# The shortcut learner: trained where a background texture gives the class away.
# Fewer samples and epochs than `shapes`: the cue is learnt within the first epoch,
# and a short run leaves the shapes themselves mostly unlearnt, as in the cautionary
# "bird on a tree" tale this model exists to demonstrate.
SPURIOUS_TRAIN_SEED = 21
SPURIOUS_EVAL_SEED = 22
SPURIOUS_TRAIN_SAMPLES = 12_000
SPURIOUS_EVAL_SAMPLES = 2_000
SPURIOUS_EPOCHS = 4
SPURIOUS_BATCH = 64

STEERING_TRAIN_SEED = 11
STEERING_EVAL_SEED = 12
STEERING_TRAIN_SAMPLES = 16_000
STEERING_EVAL_SAMPLES = 2_000
STEERING_EPOCHS = 10
STEERING_BATCH = 64


def build_shapes_model(name: str = "shapes") -> keras.Model:
    """A small VGG-like classifier whose last conv map is 8x8, fine enough for Grad-CAM."""
    inputs = keras.Input(shape=SHAPE_IMAGE_SHAPE, name="image", dtype="float32")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.MaxPooling2D(2, name="pool3")(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv4")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(128, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(len(SHAPE_CLASSES), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def build_spurious_model() -> keras.Model:
    """The shapes architecture, layer for layer, so the two models differ only by data."""
    return build_shapes_model(name="shapes_spurious")


def build_steering_model() -> keras.Model:
    """PilotNet (Bojarski et al., 2016) with its original 66x200 input and layer plan."""
    inputs = keras.Input(shape=ROAD_SHAPE, name="image", dtype="float32")
    x = keras.layers.Conv2D(24, 5, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(36, 5, strides=2, activation="relu", name="conv2")(x)
    x = keras.layers.Conv2D(48, 5, strides=2, activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv4")(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv5")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(100, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(50, activation="relu", name="fc2")(x)
    x = keras.layers.Dense(10, activation="relu", name="fc3")(x)
    outputs = keras.layers.Dense(1, activation="tanh", name="steering")(x)
    return keras.Model(inputs, outputs, name="steering")


def _optimizer(steps: int) -> keras.optimizers.Optimizer:
    # Cosine decay lets the last epochs settle instead of bouncing at a high rate.
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps, alpha=0.02)
    return keras.optimizers.Adam(learning_rate=schedule)


def _batches(
    images: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, mirror: bool = False
) -> tf.data.Dataset:
    """Reshuffled mini-batches gathered from host arrays one batch at a time.

    Handing whole arrays to ``fit`` makes several in-memory copies of the training set
    (gigabytes for the road scenes); gathering per batch keeps just the one. With
    ``mirror`` the index range is doubled and the upper half is served left/right
    flipped with a negated target, so the augmented set is never materialised.
    """
    n = len(targets)
    total = 2 * n if mirror else n

    def take(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = images[idx % n]
        y = targets[idx % n]
        if mirror:
            flip = idx >= n
            x[flip] = x[flip, :, ::-1]
            y[flip] = -y[flip]
        return x, y

    def gather(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(take, [idx], (tf.float32, tf.as_dtype(targets.dtype)))
        x.set_shape((None, *images.shape[1:]))
        y.set_shape((None,))
        return x, y

    order = tf.data.Dataset.range(total).shuffle(total, seed=seed, reshuffle_each_iteration=True)
    return order.batch(batch_size).map(gather).prefetch(2)


def _save_inference_copy(
    trained: keras.Model, build: Callable[[], keras.Model], path: Path
) -> None:
    """Save weights in a fresh, uncompiled twin so the file carries no optimizer state."""
    clean = build()
    clean.set_weights(trained.get_weights())
    path.parent.mkdir(parents=True, exist_ok=True)
    clean.save(path)


def train_shapes(out_dir: Path) -> dict[str, Any]:
    """Train, evaluate and save the shapes classifier; return its metrics."""
    start = time.perf_counter()
    train = generate_shapes(SHAPES_TRAIN_SAMPLES, SHAPES_TRAIN_SEED)
    held_out = generate_shapes(SHAPES_EVAL_SAMPLES, SHAPES_EVAL_SEED)
    data_s = time.perf_counter() - start

    keras.utils.set_random_seed(KERAS_SEED)
    model = build_shapes_model()
    batches = _batches(train.images, train.labels, SHAPES_BATCH, seed=SHAPES_TRAIN_SEED)
    steps = SHAPES_EPOCHS * len(batches)
    model.compile(
        optimizer=_optimizer(steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit_start = time.perf_counter()
    model.fit(batches, epochs=SHAPES_EPOCHS, shuffle=False, verbose=2)
    fit_s = time.perf_counter() - fit_start

    probs = model.predict(held_out.images, batch_size=256, verbose=0)
    predicted = probs.argmax(axis=1)
    accuracy = float((predicted == held_out.labels).mean())
    per_class = {
        name: float((predicted[held_out.labels == k] == k).mean())
        for k, name in enumerate(SHAPE_CLASSES)
    }
    path = out_dir / "shapes" / MODEL_VERSION / MODEL_FILENAME
    _save_inference_copy(model, build_shapes_model, path)
    return {
        "path": str(path.relative_to(out_dir)),
        "classes": list(SHAPE_CLASSES),
        "train_seed": SHAPES_TRAIN_SEED,
        "eval_seed": SHAPES_EVAL_SEED,
        "train_samples": SHAPES_TRAIN_SAMPLES,
        "eval_samples": SHAPES_EVAL_SAMPLES,
        "epochs": SHAPES_EPOCHS,
        "batch_size": SHAPES_BATCH,
        "eval_accuracy": round(accuracy, 4),
        "eval_accuracy_per_class": {k: round(v, 4) for k, v in per_class.items()},
        "params": int(model.count_params()),
        "data_seconds": round(data_s, 1),
        "fit_seconds": round(fit_s, 1),
    }


def _accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    probs = model.predict(images, batch_size=256, verbose=0)
    return round(float((probs.argmax(axis=1) == labels).mean()), 4)


def train_spurious(out_dir: Path) -> dict[str, Any]:
    """Train and save the shortcut learner; evaluate it with the cue as in training,
    without the cue and with a cue unrelated to the class (the same scenes each time).
    """
    start = time.perf_counter()
    train = generate_cued_shapes(SPURIOUS_TRAIN_SAMPLES, SPURIOUS_TRAIN_SEED, cue="class")
    held_out = {
        mode: generate_cued_shapes(SPURIOUS_EVAL_SAMPLES, SPURIOUS_EVAL_SEED, cue=mode)
        for mode in ("class", "none", "random")
    }
    data_s = time.perf_counter() - start

    keras.utils.set_random_seed(KERAS_SEED)
    model = build_spurious_model()
    batches = _batches(train.images, train.labels, SPURIOUS_BATCH, seed=SPURIOUS_TRAIN_SEED)
    steps = SPURIOUS_EPOCHS * len(batches)
    model.compile(
        optimizer=_optimizer(steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit_start = time.perf_counter()
    model.fit(batches, epochs=SPURIOUS_EPOCHS, shuffle=False, verbose=2)
    fit_s = time.perf_counter() - fit_start

    path = out_dir / "shapes-spurious" / MODEL_VERSION / MODEL_FILENAME
    _save_inference_copy(model, build_spurious_model, path)
    return {
        "path": str(path.relative_to(out_dir)),
        "classes": list(SHAPE_CLASSES),
        "train_seed": SPURIOUS_TRAIN_SEED,
        "eval_seed": SPURIOUS_EVAL_SEED,
        "train_samples": SPURIOUS_TRAIN_SAMPLES,
        "eval_samples": SPURIOUS_EVAL_SAMPLES,
        "epochs": SPURIOUS_EPOCHS,
        "batch_size": SPURIOUS_BATCH,
        "train_accuracy": _accuracy(model, train.images, train.labels),
        # Held out, cue as in training (texture k with class k).
        "eval_accuracy": _accuracy(model, held_out["class"].images, held_out["class"].labels),
        "eval_accuracy_no_cue": _accuracy(model, held_out["none"].images, held_out["none"].labels),
        "eval_accuracy_random_cue": _accuracy(
            model, held_out["random"].images, held_out["random"].labels
        ),
        "params": int(model.count_params()),
        "data_seconds": round(data_s, 1),
        "fit_seconds": round(fit_s, 1),
    }


def train_steering(out_dir: Path) -> dict[str, Any]:
    """Train, evaluate and save the steering regressor; return its metrics."""
    start = time.perf_counter()
    train = generate_roads(STEERING_TRAIN_SAMPLES, STEERING_TRAIN_SEED)
    held_out = generate_roads(STEERING_EVAL_SAMPLES, STEERING_EVAL_SEED)
    data_s = time.perf_counter() - start

    keras.utils.set_random_seed(KERAS_SEED)
    model = build_steering_model()
    # The scenes are left/right symmetric and the target is odd in the geometry, so a
    # mirrored image with the negated angle is another valid sample for free.
    batches = _batches(
        train.images, train.angles, STEERING_BATCH, seed=STEERING_TRAIN_SEED, mirror=True
    )
    steps = STEERING_EPOCHS * len(batches)
    model.compile(optimizer=_optimizer(steps), loss="mse", metrics=["mae"])
    fit_start = time.perf_counter()
    model.fit(batches, epochs=STEERING_EPOCHS, shuffle=False, verbose=2)
    fit_s = time.perf_counter() - fit_start

    predicted = model.predict(held_out.images, batch_size=256, verbose=0)[:, 0]
    errors = predicted - held_out.angles
    # The best constant a model could learn blind is the mean of the (mirrored, hence
    # zero-mean) training targets.
    baseline = np.abs(held_out.angles)
    path = out_dir / "steering" / MODEL_VERSION / MODEL_FILENAME
    _save_inference_copy(model, build_steering_model, path)
    return {
        "path": str(path.relative_to(out_dir)),
        "train_seed": STEERING_TRAIN_SEED,
        "eval_seed": STEERING_EVAL_SEED,
        "train_samples": STEERING_TRAIN_SAMPLES,
        "train_mirrored": True,
        "eval_samples": STEERING_EVAL_SAMPLES,
        "epochs": STEERING_EPOCHS,
        "batch_size": STEERING_BATCH,
        "eval_mae": round(float(np.abs(errors).mean()), 4),
        "eval_rmse": round(float(np.sqrt((errors**2).mean())), 4),
        "eval_baseline_mae": round(float(baseline.mean()), 4),
        "params": int(model.count_params()),
        "data_seconds": round(data_s, 1),
        "fit_seconds": round(fit_s, 1),
    }


TRAINERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "shapes": train_shapes,
    "shapes-spurious": train_spurious,
    "steering": train_steering,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="model repository root")
    parser.add_argument("--only", choices=sorted(TRAINERS), help="train just this model")
    args = parser.parse_args(argv)
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics_path = out_dir / METRICS_FILENAME
    # Retraining one model must not drop the other model's figures.
    metrics: dict[str, Any] = {}
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
    metrics["keras_seed"] = KERAS_SEED
    metrics["keras_version"] = keras.__version__
    names = [args.only] if args.only else list(TRAINERS)
    for name in names:
        print(f"== training {name}", flush=True)
        start = time.perf_counter()
        metrics[name] = TRAINERS[name](out_dir)
        metrics[name]["total_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(metrics[name], indent=2), flush=True)
        metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
