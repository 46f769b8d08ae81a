"""``automodel-plugins inspect``: what loading a checkpoint would do, from its config and headers alone (for a
hub repo id: ``config.json`` and the index downloaded, the shards' headers read with range requests)."""

from __future__ import annotations

import argparse
import json

from automodel_plugins.cli.exits import EXIT_OK
from automodel_plugins.cli.hub import add_hub_options, hub_options
from automodel_plugins.cli.render import block

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="describe a checkpoint directory or hub repo id (no tensor data is read or downloaded)",
    )
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory (or file in one), or hub repo id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a readable block")
    add_hub_options(inspect)
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from automodel_plugins.pipeline.load.describe import describe_checkpoint

    description = describe_checkpoint(args.path, **hub_options(args))
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print("\n".join(block(description)))
    return EXIT_OK
