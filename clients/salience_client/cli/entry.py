"""The `salience` entry point: the parser of every command, and `main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from salience_client import tensors
from salience_client.cli import audit, bench, explain, models, predict, review, serve
from salience_client.cli.options import (
    DEFAULT_TARGET,
    EXIT_FAILURE,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_USAGE,
    TARGET_ENV,
    TOKEN_ENV,
    UsageError,
    connection_parser,
)
from salience_client.results import SalienceError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand but `serve`, whose flags belong to the server."""
    parser = argparse.ArgumentParser(
        prog="salience",
        description="Serve Keras models and explain their predictions with saliency maps.",
        epilog="Run `salience COMMAND --help` for the options of one command. Exit status: "
        f"{EXIT_OK} on success, {EXIT_FAILURE} when the server answers with an error or "
        f"cannot be reached, {EXIT_USAGE} for a usage error (a bad option, input or output), "
        f"{EXIT_NOT_READY} when `salience models --wait` finds a model failed or still "
        "loading.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(commands)
    connection = connection_parser()
    for command in (models, predict, explain, bench, review, audit):
        command.add_parser(commands, connection)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and cross-checks a command line (not `serve`); usage errors exit 2."""
    args = build_parser().parse_args(list(argv))
    check = getattr(args, "check", None)
    if check is not None:
        del args.check
        check(args)
    return args


def report_error(err: SalienceError, target: str, timeout: float | None) -> None:
    """`error: STATUS: message`, with a hint for the failures a user can fix here."""
    print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
    if err.code == grpc.StatusCode.UNAVAILABLE:
        print(
            f"hint: no salience server answered at {target}: start one with `salience serve`, "
            f"or point --target (or ${TARGET_ENV}) at a running one",
            file=sys.stderr,
        )
    elif err.code == grpc.StatusCode.UNAUTHENTICATED:
        print(
            f"hint: the server asks for a bearer token: pass --token-file FILE, or set "
            f"${TOKEN_ENV}",
            file=sys.stderr,
        )
    elif err.code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        print(
            f"hint: the call took longer than --timeout {timeout:g} seconds: raise it, or send "
            "fewer inputs",
            file=sys.stderr,
        )


def _exit_status(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `salience` command line; returns its exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    # Overlays only read matplotlib's colormaps, but should anything load a backend in
    # this process, it must be one that needs no display.
    os.environ.setdefault("MPLBACKEND", "Agg")
    args: argparse.Namespace | None = None
    try:
        if words[:1] == ["serve"]:
            return serve.run(words[1:])
        args = parse_args(words)
        status: int = args.run(args)
        return status
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        return _exit_status(exit_.code)
    except UsageError as err:
        command = f"salience {args.command}" if args is not None else "salience"
        print(f"{command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SalienceError as err:
        report_error(err, getattr(args, "target", DEFAULT_TARGET), getattr(args, "timeout", None))
        return EXIT_FAILURE
    except tensors.TensorError as err:
        print(f"error: the server's answer cannot be decoded: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`salience models --json | head`): nothing more to
        # say, and nothing to flush; Python's own flush at exit would fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
