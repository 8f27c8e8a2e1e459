"""`salience serve [flags]`: the server's command line, parsed by its own settings.

The client's `salience` command hands `serve` and its flags here, so the client
never imports the server to build its own parser. Settings are checked before the
server's heavy dependencies (TensorFlow) are imported: a bad flag fails at once.

Exit status: 0 after a clean shutdown, 1 when the server cannot start (a model
repository, plugin or port it cannot use, or a dependency not installed), 2 for a
bad flag or setting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from salience_server.settings import Settings, SettingsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
SERVER_EXTRA_HINT = "install the server with: pip install 'salience[server]'"


def build_parser() -> argparse.ArgumentParser:
    """The parser of `salience serve`: every field of `Settings` as a flag."""
    parser = argparse.ArgumentParser(
        prog="salience serve",
        description="Serve the Keras models of a model repository over gRPC. Every flag "
        "can also be set by its SALIENCE_* environment variable.",
    )
    Settings.add_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """Runs `salience serve` with these flags until shut down; returns the exit status."""
    flags = build_parser().parse_args(list(argv))
    try:
        settings = Settings.load(flags)
    except SettingsError as err:
        print(f"salience serve: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from salience_server.logs import import_tensorflow

        # First, so that its start-up lines are written once each, in the server's format.
        import_tensorflow()
        from salience_server.app import serve
        from salience_server.plugins import PluginError
        from salience_server.repository import RepositoryError
    except ImportError as err:
        # The server package ships with the client; its dependencies come with the extra.
        print(
            f"salience serve: a server dependency is missing ({err}); {SERVER_EXTRA_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        serve(settings)
    except (RepositoryError, PluginError, SettingsError, OSError) as err:
        print(f"salience serve: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
