"""``automodel-plugins``: list the installed plugins and who claims a config; inspect and convert a checkpoint.

One module per command (``listing``, ``describe``, ``convert``), each adding its own sub-parser; ``render``
draws tables and nested values; ``hub`` holds the hub flags the commands share, ``exits`` the exit statuses. ``list`` without ``--config`` imports neither torch nor transformers, so it answers in
well under a second. Exit codes: 0 success, 2 a user-facing problem (bad config, claim conflict or error,
unknown plugin name), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from automodel_plugins._version import __version__
from automodel_plugins.cli import convert, describe, listing
from automodel_plugins.cli.exits import EXIT_OK, EXIT_USER_ERROR
from automodel_plugins.errors import AutomodelPluginsError, cli_spelling

__all__ = ["EXIT_OK", "EXIT_USER_ERROR", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, so tests can call it."""
    args = _parser().parse_args(argv)
    try:
        with cli_spelling():  # errors name --revision, not revision=
            return args.handler(args)
    except AutomodelPluginsError as exc:
        print(f"automodel-plugins: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


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
