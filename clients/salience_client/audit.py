r"""`salience audit`: is the model looking at the bird or at the tree.

    salience audit --model shapes,shapes-spurious --data generated --count 64 \
        --methods vanilla,gradcam,guided-backprop --json audit.json --report audit.html

For every image of a data set with object masks it asks the server for maps (one
request per predicted class and batch, never per image) and scores them:

- **where the map lands**: the share of the map's mass inside the object mask and
  inside the cue mask when there is one, and the pointing game (is the maximum
  inside); distributions over the images.
- **is it faithful**: deletion and insertion curves (Petsiuk et al. 2018, RISE):
  the pixels are removed from the image (deletion: replaced by zeros) or added to a
  blurred copy (insertion) in order of saliency in `--steps` steps, and the model's
  output for the class it first predicted is read back with Predict at every step
  (batched). The same curves with a random ordering per image are the baseline a
  map has to beat: lower deletion area, higher insertion area.
- **sanity check** (Adebayo et al. 2018): maps of copies of the model with its top
  1, 2, ... weighted layers re-initialised (`Explanation.randomization`: the server
  builds the copies, the client needs no TensorFlow), compared with the trained
  model's maps by Spearman rank correlation. A faithful method's correlation drops.

Data: `generated` draws `--count` fresh images from the demo generator for the
model's input shape (64×64×3: shapes with a background texture cue of random kind,
`salience_server.demo.data.generate_cued_shapes(cue="random")`, so the cue says
nothing about the class and every model is audited on the same images), or DIR:
images `NAME.png` (or .jpg) with their object mask `NAME.mask.png` beside them
(non-zero pixels are the object) and optionally a cue mask `NAME.cue.png`; images
must have the model's input size and are sent as float32 in [0, 1].

Output: `--json FILE` (or stdout) for machines, `--report FILE.html` (one file,
plots and images embedded), `--plot FILE.png` (the energy-share plot alone).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from salience_client import audit_metrics as am
from salience_client.client import SalienceClient
from salience_client.inputs import UsageError
from salience_client.results import SalienceError

# Audit names of the maps: the server's method plus options (guided backprop is
# vanilla saliency with the guided backprop modifier).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "vanilla": {"method": "vanilla"},
    "gradcam": {"method": "gradcam"},
    "gradcam++": {"method": "gradcam++"},
    "guided-backprop": {"method": "vanilla", "backprop_modifier": "guided"},
    "guided-gradcam": {"method": "guided-gradcam"},
    "smoothgrad": {"method": "smoothgrad", "seed": 0},
    "integrated-gradients": {"method": "integrated-gradients"},
    "gradient-x-input": {"method": "gradient-x-input"},
    "scorecam": {"method": "scorecam"},
    "faster-scorecam": {"method": "faster-scorecam"},
    "layercam": {"method": "layercam"},
    "occlusion": {"method": "occlusion"},
    "blur-ig": {"method": "blur-ig"},
    "guided-ig": {"method": "guided-ig"},
    "xrai": {"method": "xrai"},
}
DEFAULT_METHODS = "vanilla,gradcam,guided-backprop"
DEFAULT_COUNT = 64
DEFAULT_STEPS = 16
DEFAULT_SEED = 2024
DEFAULT_BATCH = 64
DEFAULT_BLUR_SIGMA = 4.0
DEFAULT_RANDOMIZE_IMAGES = 16
WORST = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class AuditData:
    """Images (N, H, W, C) float32, object masks (N, H, W), optional cue masks and labels."""

    images: np.ndarray
    masks: np.ndarray
    cue_masks: np.ndarray | None
    labels: np.ndarray | None
    names: list[str]
    source: str


# Data ------------------------------------------------------------------------


def generated_data(shape: Sequence[int], count: int, seed: int) -> AuditData:
    """Fresh audit images for a model input shape (batch axis excluded)."""
    from salience_server.demo.data import SHAPE_IMAGE_SHAPE, generate_cued_shapes

    if tuple(shape) != SHAPE_IMAGE_SHAPE:
        raise UsageError(
            f"--data generated makes shapes images {list(SHAPE_IMAGE_SHAPE)}; the model takes "
            f"{list(shape)}: pass a directory of images with .mask.png masks instead"
        )
    data = generate_cued_shapes(count, seed, cue="random")
    return AuditData(
        images=data.images,
        masks=data.masks,
        cue_masks=data.cue_masks,
        labels=data.labels,
        names=[f"generated-{seed}-{i}" for i in range(count)],
        source=f"generated (shapes with a random background cue, seed {seed})",
    )


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(Image.open(path).convert("L")) > 0
    if mask.shape != size:
        raise UsageError(f"mask {path} is {mask.shape}, its image {size}: they must agree")
    return mask


def directory_data(directory: Path, shape: Sequence[int], count: int) -> AuditData:
    """Images with `NAME.mask.png` (object) and optional `NAME.cue.png` beside them."""
    if not directory.is_dir():
        raise UsageError(f"--data {directory} is neither 'generated' nor a directory")
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith((".mask", ".cue"))
    )[:count]
    if not files:
        raise UsageError(f"--data {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    channels = shape[-1] if len(shape) == 3 else 1
    images, masks, cues = [], [], []
    for path in files:
        mask_path = path.with_name(f"{path.stem}.mask.png")
        if not mask_path.is_file():
            raise UsageError(f"image {path} has no object mask {mask_path.name} beside it")
        mode = "RGB" if channels == 3 else "L"
        pixels = np.asarray(Image.open(path).convert(mode), dtype=np.float32) / 255.0
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if list(pixels.shape) != list(shape):
            raise UsageError(f"image {path} is {list(pixels.shape)}: the model takes {list(shape)}")
        images.append(pixels)
        masks.append(_read_mask(mask_path, pixels.shape[:2]))
        cue_path = path.with_name(f"{path.stem}.cue.png")
        cues.append(_read_mask(cue_path, pixels.shape[:2]) if cue_path.is_file() else None)
    has_cues = all(c is not None for c in cues)
    return AuditData(
        images=np.stack(images),
        masks=np.stack(masks),
        cue_masks=np.stack([c for c in cues if c is not None]) if has_cues else None,
        labels=None,
        names=[p.name for p in files],
        source=str(directory),
    )


# Service calls (batched) -----------------------------------------------------


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def predict_scores(
    client: SalienceClient, model: str, images: np.ndarray, batch: int
) -> np.ndarray:
    """The model's first output for every image, (N, units), in batches."""
    parts = []
    for rows in _chunks(len(images), batch):
        outputs = client.predict(model, images[rows].astype(np.float32)).outputs
        parts.append(np.asarray(next(iter(outputs.values())), dtype=np.float64))
    return np.concatenate(parts).reshape(len(images), -1)


def explain_maps(
    client: SalienceClient,
    model: str,
    images: np.ndarray,
    classes: np.ndarray,
    batch: int,
    options: dict[str, Any],
) -> np.ndarray:
    """One (H, W) map per image for its class: one request per class and batch."""
    maps: np.ndarray | None = None
    for label in np.unique(classes):
        rows = np.flatnonzero(classes == label)
        for part in _chunks(len(rows), batch):
            index = rows[part]
            result = client.explain(
                model, images[index].astype(np.float32), filter_indices=[int(label)], **options
            )
            got = np.asarray(next(iter(result.maps.values())), dtype=np.float64)
            if got.ndim == 4:  # keepdims maps: the channel max, as the default reduces
                got = got.max(axis=-1)
            if maps is None:
                maps = np.zeros((len(images), *got.shape[1:]))
            maps[index] = got
    assert maps is not None
    return maps


def curve_scores(
    client: SalienceClient,
    model: str,
    images: np.ndarray,
    baselines: np.ndarray,
    orders: np.ndarray,
    classes: np.ndarray,
    steps: int,
    mode: str,
    batch: int,
) -> np.ndarray:
    """(N, steps + 1) scores of the predicted class along each image's curve."""
    per_batch = max(1, batch // (steps + 1))
    out = np.zeros((len(images), steps + 1))
    for rows in _chunks(len(images), per_batch):
        series = np.concatenate(
            [
                am.perturbation_series(images[i], baselines[i], orders[i], steps, mode)
                for i in range(rows.start, rows.stop)
            ]
        )
        scores = predict_scores(client, model, series, batch)
        picked = scores.reshape(rows.stop - rows.start, steps + 1, -1)
        out[rows] = picked[np.arange(rows.stop - rows.start), :, classes[rows]]
    return out


def weighted_layer_count(client: SalienceClient, model: str, image: np.ndarray) -> int:
    """How many weighted layers the server can re-initialise: the first depth it
    refuses (INVALID_ARGUMENT, before any work) ends the count.
    """
    import grpc

    layers = [info for info in client.metadata(model).layers]
    for k in range(1, len(layers) + 1):
        try:
            client.explain(model, image[None].astype(np.float32), randomize_layers=k)
        except SalienceError as err:
            if err.code == grpc.StatusCode.INVALID_ARGUMENT and "randomization" in err.details:
                return k - 1
            raise
    return len(layers)


# The audit -------------------------------------------------------------------


def audit_model(
    client: SalienceClient,
    model: str,
    data: AuditData,
    methods: Sequence[str],
    args: argparse.Namespace,
    progress: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures of one model (JSON-ready) and the arrays the report draws."""
    images = data.images.astype(np.float64)
    n = len(images)
    batch = args.batch_size
    probs = predict_scores(client, model, images, batch)
    classes = probs.argmax(axis=1)
    progress(f"{model}: predicted")
    figures: dict[str, Any] = {"images": n, "methods": {}}
    if data.labels is not None:
        figures["accuracy"] = float((classes == data.labels).mean())

    rng = np.random.default_rng(args.seed)
    pixels = images.shape[1] * images.shape[2]
    random_orders = np.stack([am.random_order(pixels, rng) for _ in range(n)])
    blurred = np.stack([am.blur(x, args.blur_sigma) for x in images])
    zeros = np.zeros_like(images)
    base = {
        am.DELETION: blurred if args.baseline == "blur" else zeros,
        am.INSERTION: zeros if args.baseline == "zeros" else blurred,
    }
    curves: dict[str, Any] = {"random": {}}
    for mode in (am.DELETION, am.INSERTION):
        curves["random"][mode] = curve_scores(
            client, model, images, base[mode], random_orders, classes, args.steps, mode, batch
        )
    progress(f"{model}: random baseline")

    depth = 0
    randomized_images = min(n, max(0, args.randomize_images))
    if randomized_images:
        depth = weighted_layer_count(client, model, images[0])
    arrays: dict[str, Any] = {"classes": classes, "maps": {}, "curves": curves}
    for name in methods:
        options = METHOD_OPTIONS[name]
        maps = explain_maps(client, model, images, classes, batch, options)
        arrays["maps"][name] = maps
        energy = am.energy_share(maps, data.masks)
        entry: dict[str, Any] = {
            "energy_object": am.summary(energy),
            "energy_object_per_image": [round(float(v), 5) for v in energy],
            "pointing_object": float(am.pointing_game(maps, data.masks).mean()),
        }
        if data.cue_masks is not None:
            cue = am.energy_share(maps, data.cue_masks)
            entry["energy_cue"] = am.summary(cue)
            entry["energy_cue_per_image"] = [round(float(v), 5) for v in cue]
            entry["pointing_cue"] = float(am.pointing_game(maps, data.cue_masks).mean())
        progress(f"{model}: {name} maps")
        orders = np.stack([am.saliency_order(m) for m in maps])
        curves[name] = {}
        for mode in (am.DELETION, am.INSERTION):
            scores = curve_scores(
                client, model, images, base[mode], orders, classes, args.steps, mode, batch
            )
            curves[name][mode] = scores
            area = am.curve_area(scores)
            random_area = am.curve_area(curves["random"][mode])
            entry[mode] = {
                "area": am.summary(area),
                "random_area": am.summary(random_area),
                "curve": [float(v) for v in scores.mean(axis=0)],
                "random_curve": [float(v) for v in curves["random"][mode].mean(axis=0)],
                # Per image: how much better than a random order (deletion: lower is better).
                "beats_random": float(
                    (area < random_area if mode == am.DELETION else area > random_area).mean()
                ),
            }
        progress(f"{model}: {name} deletion/insertion")
        cascade = []
        sub = slice(0, randomized_images)
        for k in range(1, depth + 1):
            result_maps = explain_maps(
                client,
                model,
                images[sub],
                classes[sub],
                batch,
                {**options, "randomize_layers": k, "randomize_seed": args.seed},
            )
            rho = [am.spearman(a, b) for a, b in zip(maps[sub], result_maps, strict=True)]
            cascade.append({"layers": k, "spearman": am.summary(rho)})
        if cascade:
            names = _randomized_names(client, model, images[0], depth, options, args.seed)
            for item, layer in zip(cascade, names, strict=True):
                item["layer"] = layer
        entry["randomization"] = cascade
        progress(f"{model}: {name} randomisation")
        entry["worst_images"] = [int(i) for i in np.argsort(energy, kind="stable")[:WORST]]
        figures["methods"][name] = entry
    return figures, arrays


def _randomized_names(
    client: SalienceClient,
    model: str,
    image: np.ndarray,
    depth: int,
    options: dict[str, Any],
    seed: int,
) -> list[str]:
    """The layer each depth adds, as the server echoes it (output first)."""
    result = client.explain(
        model,
        image[None].astype(np.float32),
        **{**options, "randomize_layers": depth, "randomize_seed": seed},
    )
    return list(result.resolved.randomized_layers)


def summary_lines(result: dict[str, Any]) -> str:
    """One line per model and method: the figures that answer the question, each
    named with its statistic (the median energy share over the images, as the report
    and the README give it; the mean curve areas, as the report gives them).
    """
    lines = []
    for model, figures in result["models"].items():
        for name, m in figures["methods"].items():
            cue = m.get("energy_cue", {}).get("median")
            lines.append(
                f"{model:>16} {name:>16}: median energy on object "
                f"{m['energy_object']['median']:.3f}"
                + (f", on cue {cue:.3f}" if cue is not None else "")
                + f"; mean insertion area {m['insertion']['area']['mean']:.3f} vs random "
                f"{m['insertion']['random_area']['mean']:.3f}"
            )
    return "\n".join(lines)


# Pictures --------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    # The Figure API without pyplot: no display, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def energy_plot(result: dict[str, Any]) -> bytes:
    """Box plots of the energy share on the object and on the cue, per model and method."""
    models = result["models"]
    boxes_per_model = max(len(f["methods"]) for f in models.values()) * 2
    figure = _figure(0.75 * boxes_per_model * len(models) + 1, 4.0)
    axes = figure.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, (model, figures) in zip(axes, models.items(), strict=True):
        names = list(figures["methods"])
        data, labels, colours = [], [], []
        for name in names:
            m = figures["methods"][name]
            data.append(m["energy_object_per_image"])
            labels.append(f"{name}: object")
            colours.append("#1b9e77")
            if "energy_cue_per_image" in m:
                data.append(m["energy_cue_per_image"])
                labels.append(f"{name}: cue")
                colours.append("#d95f02")
        boxes = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, colour in zip(boxes["boxes"], colours, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(model)
        area = result["object_area"]["mean"]
        ax.axhline(area, color="#1b9e77", lw=0.8, ls=":")
        if "cue_area" in result:
            ax.axhline(result["cue_area"]["mean"], color="#d95f02", lw=0.8, ls=":")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of map energy inside the mask")
    figure.suptitle("Where the maps land (dotted: area share, the score of a blind map)")
    return _png(figure)


def curves_plot(figures: dict[str, Any]) -> bytes:
    figure = _figure(8, 3.2)
    axes = figure.subplots(1, 2)
    for ax, mode in zip(axes, (am.DELETION, am.INSERTION), strict=True):
        random_curve = None
        for name, m in figures["methods"].items():
            curve = m[mode]["curve"]
            t = np.linspace(0, 1, len(curve))
            ax.plot(t, curve, label=f"{name} (mean area {m[mode]['area']['mean']:.2f})")
            random_curve = m[mode]["random_curve"]
        if random_curve is not None:
            t = np.linspace(0, 1, len(random_curve))
            area = float(am.curve_area(np.asarray(random_curve)))
            ax.plot(t, random_curve, "k--", label=f"random (area of the mean {area:.2f})")
        ax.set_title(f"{mode} (area)")
        ax.set_xlabel("fraction of pixels " + ("removed" if mode == am.DELETION else "inserted"))
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("score of the predicted class")
    return _png(figure)


def randomization_plot(figures: dict[str, Any]) -> bytes:
    figure = _figure(5, 3.2)
    ax = figure.subplots()
    for name, m in figures["methods"].items():
        cascade = m["randomization"]
        if not cascade:
            continue
        ax.plot(
            [c["layers"] for c in cascade],
            [c["spearman"]["mean"] for c in cascade],
            marker="o",
            label=name,
        )
        ax.set_xticks(
            [c["layers"] for c in cascade],
            [f"{c['layers']}\n{c.get('layer', '')}" for c in cascade],
            fontsize=7,
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(-0.3, 1.05)
    ax.set_xlabel("weighted layers re-initialised (from the output down)")
    ax.set_ylabel("Spearman ρ with the trained model's map")
    ax.legend(fontsize=7)
    return _png(figure)


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _worst_strip(
    data: AuditData, maps: np.ndarray, indices: Sequence[int], energy: Sequence[float]
) -> bytes:
    from salience_client.overlay import overlay
    from salience_client.report import png_bytes, titled

    panels = []
    for i in indices:
        shown = overlay(data.images[i], maps[i])
        edge = data.masks[i] ^ np.roll(data.masks[i], 1, axis=0)
        shown[edge] = (255, 255, 255)  # the object's outline
        panels.append(titled(shown, f"{data.names[i]}: {energy[i]:.2f}", min_width=160))
    height = max(p.shape[0] for p in panels)
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, 6), (0, 0)), constant_values=255) for p in panels
    ]
    return png_bytes(np.concatenate(padded, axis=1))


def _vs_random(curve: dict[str, Any]) -> str:
    return f"{curve['area']['mean']:.3f} ({curve['random_area']['mean']:.3f})"


def render_report(result: dict[str, Any], arrays: dict[str, Any], data: AuditData) -> str:
    """The self-contained HTML report: every plot and image is a data URI."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>salience audit</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}</style></head><body>",
        "<h1>Is the model looking at the object?</h1>",
        f"<p>Data: {html.escape(result['data'])}, {result['images']} images; deletion/insertion "
        f"in {result['steps']} steps, baseline {html.escape(result['baseline'])}.</p>",
        f"<img alt='energy share' src='{_uri(energy_plot(result))}'>",
        "<table><tr><th>model</th><th>method</th><th>median energy on object</th>"
        "<th>on cue</th><th>pointing (object), share of images</th>"
        "<th>mean deletion area (random)</th><th>mean insertion area (random)</th></tr>",
    ]
    for model, figures in result["models"].items():
        for name, m in figures["methods"].items():
            cue = m.get("energy_cue", {}).get("median")
            parts.append(
                f"<tr><td>{html.escape(model)}</td><td>{html.escape(name)}</td>"
                f"<td>{m['energy_object']['median']:.3f}</td>"
                f"<td>{'' if cue is None else f'{cue:.3f}'}</td>"
                f"<td>{m['pointing_object']:.2f}</td>"
                f"<td>{_vs_random(m['deletion'])}</td><td>{_vs_random(m['insertion'])}</td></tr>"
            )
    parts.append("</table><p>Energy: medians over the images; areas: means over the images.</p>")
    for model, figures in result["models"].items():
        parts.append(f"<h2>{html.escape(model)}</h2>")
        if "accuracy" in figures:
            parts.append(f"<p>Accuracy on these images: {figures['accuracy']:.3f}</p>")
        parts.append(f"<h3>Faithfulness</h3><img alt='curves' src='{_uri(curves_plot(figures))}'>")
        parts.append(
            "<h3>Sanity check: cascading randomisation</h3>"
            f"<img alt='randomisation' src='{_uri(randomization_plot(figures))}'>"
        )
        parts.append("<h3>Images with the least map energy on the object</h3>")
        for name, m in figures["methods"].items():
            strip = _worst_strip(
                data, arrays[model]["maps"][name], m["worst_images"], m["energy_object_per_image"]
            )
            label = html.escape(name)
            parts.append(f"<h4>{label}</h4><img alt='worst {label}' src='{_uri(strip)}'>")
    parts.append(
        "<script type='application/json' id='figures'>"
        + json.dumps(result).replace("</", "<\\/")
        + "</script></body></html>"
    )
    return "\n".join(parts)
