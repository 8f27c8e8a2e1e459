"""The `salience` command line: serve models, list them, predict and explain from files.

    salience serve --model-repository models/ --port 50051
    salience models --wait --json          # --target, or $SALIENCE_TARGET
    salience predict --model shapes --out predictions.npz cat.png dog.png
    salience explain --model shapes --filter-indices 2 --grad-modifier relu --out maps/ cat.png
    salience bench --model shapes --rpc explain --concurrency 32 --duration 20
    salience review --model steering --out review/ clip/        # or a video file

An INPUT is a `.npy` file (one sample, or a batch with the batch axis first) or an
image Pillow can read. The model's metadata says how to read it: a `.npy` sample
gets a batch axis, floating-point values are cast to the model's float dtype, and
images become float values in [0, 1] with the model's channel count. Images are
never resized: a size mismatch is an error naming both sizes.

Exit status: 0 on success, 1 when the server answers with an error (or cannot be
reached), 2 for a usage error (bad option, unreadable input, output that cannot be
written), 3 from `salience models --wait` when a model failed to load or was still
loading when the wait ran out. User errors print one message, never a traceback.

The package is one module per command (`models`, `predict`, `explain`, `bench`,
`review`, `audit`, `serve`), the options every command shares (`options`), the
explanation options of `explain` and `bench` (`explanation_options`), INPUT loading
(`inputs`), what commands write (`outputs`) and the entry point (`entry`).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `salience` command line; returns its exit status (see `entry.main`)."""
    # Imported here, so that importing one of the package's modules never loads all.
    from salience_client.cli.entry import main as run

    return run(argv)
