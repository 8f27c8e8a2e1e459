"""`salience serve`: listed in the client's help, run by the server package.

The flags belong to the server (`salience_server.serve`); the client only hands
them over, so it imports the server when, and only when, `serve` is run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from salience_client.cli.options import EXIT_FAILURE

SERVER_EXTRA_HINT = "install the server with: pip install 'salience[server]'"


def add_parser(commands: Any) -> None:
    """Lists `serve` for --help only: `main` hands `serve` and its flags to the server."""
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the server (needs `pip install 'salience[server]'`; "
        "`salience serve --help` lists its flags)",
    )


def run(argv: Sequence[str]) -> int:
    """`salience serve [flags]`: the server's own command line."""
    try:
        from salience_server.serve import main
    except ImportError as err:
        print(
            f"salience serve: the server is not installed ({err}); {SERVER_EXTRA_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return main(argv)
