"""``automodel-plugins``: list the installed plugins and who claims a config; inspect and convert a checkpoint.

One module per command (``listing``, ``describe``, ``convert``), each adding its own sub-parser; ``render``
draws tables and nested values; ``hub`` holds the hub flags the commands share, ``exits`` the exit statuses. ``list`` without ``--config`` imports neither torch nor transformers, so it answers in
well under a second. Exit codes: 0 success, 2 a user-facing problem (bad config, claim conflict or error,
unknown plugin name), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import gc
import sys

from automodel_plugins._version import __version__
from automodel_plugins.cli import convert, describe, listing
from automodel_plugins.cli.exits import EXIT_OK, EXIT_USER_ERROR
from automodel_plugins.errors import AutomodelPluginsError, cli_spelling

__all__ = ["EXIT_OK", "EXIT_USER_ERROR", "main"]


_HEADER_ONLY = ("list", "inspect")
"""Commands that build many small objects (header entries, pieces, plans) and no garbage cycles worth chasing:
they run with the cyclic collector off. Each young collection walks every object made since the last one, and
all of these survive to the end of the command, so it is pure overhead: about a tenth of ``inspect``'s parse and
plan of a 73,768-tensor checkpoint even with mypy's thresholds (200,000, 30, 30), which the previous version set.
Memory is still freed by reference counting; a cycle made meanwhile waits for the next collection after the
command (the collector is switched back on for a caller in the same process)."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, so tests can call it."""
    args = _parser().parse_args(argv)
    collecting = gc.isenabled()
    if args.command in _HEADER_ONLY:
        gc.disable()
    try:
        with cli_spelling():  # errors name --revision, not revision=
            return args.handler(args)
    except AutomodelPluginsError as exc:
        print(f"automodel-plugins: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:  # a caller in the same process (a test) keeps its collector
        if collecting:
            gc.enable()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automodel-plugins",
        description="List automodel plugins, their claims; inspect and convert checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"automodel-plugins {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing.add_parser(commands)
    describe.add_parser(commands)
    convert.add_parser(commands)
    return parser
