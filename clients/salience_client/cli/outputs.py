"""What the commands write: `.npz` archives of arrays and overlay PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience_client.cli.options import UsageError
from salience_client.inputs import IMAGE_MODES, InputBatch, LoadedInput
from salience_client.results import Explanation


def check_npz(path: Path) -> None:
    if path.suffix.lower() != ".npz":
        raise UsageError(f"--out {path} must name a .npz file")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    check_npz(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a plain dict[str, Any]: numpy's stubs read `**arrays` as its keywords.
        payload: dict[str, Any] = dict(arrays)
        np.savez(path, **payload)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def output_arrays(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`predictions` (the first output) and `output_<name>` for every output."""
    arrays = {"predictions": next(iter(outputs.values()))}
    arrays.update({f"output_{name}": values for name, values in outputs.items()})
    return arrays


def explanation_arrays(result: Explanation) -> dict[str, np.ndarray]:
    """The outputs, `saliency_<modifier>` per map, and `saliency` when there is one map."""
    arrays = output_arrays(result.outputs)
    arrays.update({f"saliency_{name}": m for name, m in result.maps.items()})
    if len(result.maps) == 1:
        arrays["saliency"] = next(iter(result.maps.values()))
    if result.completeness_residual is not None and result.score_difference is not None:
        arrays["completeness_residual"] = result.completeness_residual
        arrays["score_difference"] = result.score_difference
    return arrays


def check_overlayable(batch: InputBatch, keepdims: bool) -> None:
    """Overlays need image samples (H×W or H×W×C, C in 1, 3, 4) to draw maps over."""
    sample = batch.array.shape[1:]
    if not (len(sample) == 2 or (len(sample) == 3 and sample[-1] in IMAGE_MODES)):
        raise UsageError(
            f"the inputs have samples of shape {list(sample)}, which are not images (H×W or "
            "H×W×C with C in 1, 3, 4), so no overlay can be drawn: use --out FILE.npz"
        )
    if len(sample) == 2 and not keepdims:
        # Without a channel axis the server's channel reduction takes the width away.
        raise UsageError(
            f"the inputs are H×W images {list(sample)} without a channel axis, whose maps "
            "lose the last axis to the channel reduction: add --keepdims, or use --out FILE.npz"
        )


def _unique_stems(sources: Sequence[LoadedInput]) -> list[str]:
    """File stems, with -2, -3... added to repeats, so no overlay overwrites another."""
    seen: dict[str, int] = {}
    stems = []
    for source in sources:
        stem = source.path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def write_overlays(
    directory: Path,
    batch: InputBatch,
    result: Explanation,
    *,
    colormap: str,
    alpha: float,
    titles: Sequence[str] | None = None,
) -> list[Path]:
    """`<stem>_<modifier>.png` per input (`<stem>_<i>_<modifier>.png` for a batch file).

    With `titles` (one per sample), each overlay is drawn legible at a glance: under
    its sample's title, beside a colour bar, at least `report.MIN_OVERLAY_SIDE` pixels
    on its smaller side (`report.annotated_overlay`); without, at the input's size.
    """
    from salience_client.overlay import save_overlay

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create directory {directory}: {err.strerror or err}") from None
    written = []
    k = 0
    for source, stem in zip(batch.sources, _unique_stems(batch.sources), strict=True):
        for i in range(len(source.array)):
            prefix = f"{stem}_{i}" if source.batched else stem
            for modifier, maps in result.maps.items():
                path = directory / f"{prefix}_{modifier}.png"
                try:
                    if titles is None:
                        save_overlay(path, batch.array[k], maps[k], colormap=colormap, alpha=alpha)
                    else:
                        _save_annotated(path, batch.array[k], maps[k], titles[k], colormap, alpha)
                except OSError as err:
                    raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
                written.append(path)
            k += 1
    return written


def _save_annotated(
    path: Path, image: np.ndarray, saliency: np.ndarray, title: str, colormap: str, alpha: float
) -> None:
    from PIL import Image

    from salience_client.overlay import overlay
    from salience_client.report import annotated_overlay

    rgb = overlay(image, saliency, colormap=colormap, alpha=alpha)
    Image.fromarray(annotated_overlay(rgb, title, colormap)).save(path, format="PNG")
