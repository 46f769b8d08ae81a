"""``automodel-plugins inspect``: what loading a checkpoint would do, from its config and headers alone."""

from __future__ import annotations

import argparse
import json

from automodel_plugins.cli.exits import EXIT_OK
from automodel_plugins.cli.render import block

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="describe a checkpoint directory")
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a readable block")
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from automodel_plugins.pipeline.describe import describe_checkpoint

    description = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print("\n".join(block(description)))
    return EXIT_OK
