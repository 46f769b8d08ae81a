"""The hub options ``list --config`` and ``inspect`` share: which revision, which cache, no downloads.

A token is not a flag (it would show in the shell history and the process list): ``HF_TOKEN`` or
``hf auth login`` provide it, as for every huggingface_hub tool.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_hub_options", "hub_options"]


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub repo ids (token: HF_TOKEN or `hf auth login`)")
    group.add_argument("--revision", help="branch, tag or commit of a hub repo id (default: main)")
    group.add_argument("--cache-dir", metavar="DIR", help="Hugging Face cache to use (default: HF_HUB_CACHE)")
    group.add_argument(
        "--local-files-only",
        action="store_true",
        help="never download: use only what the cache holds (as HF_HUB_OFFLINE=1)",
    )


def hub_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options as ``resolve`` / ``load_config`` / ``describe_checkpoint`` keyword arguments."""
    return {
        "revision": args.revision,
        "cache_dir": args.cache_dir,
        "local_files_only": True if args.local_files_only else None,
    }
