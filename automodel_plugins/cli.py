"""``automodel-plugins``: list the installed plugins and who claims a config; inspect a checkpoint.

``list`` without ``--config`` imports neither torch nor transformers, so it answers in well under a second.
Exit codes: 0 success, 2 a user-facing problem (bad config, claim conflict or error, unknown plugin name).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from automodel_plugins import __version__
from automodel_plugins.errors import AutomodelPluginsError

if TYPE_CHECKING:
    from automodel_plugins.registry import ClaimVerdict, PluginRecord

EXIT_OK = 0
EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, so tests can call it."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except AutomodelPluginsError as exc:
        print(f"automodel-plugins: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automodel-plugins", description="List automodel plugins, their claims, and inspect checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"automodel-plugins {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list installed plugins (and, with --config, their claims)")
    listing.add_argument(
        "--config", metavar="PATH", help="model directory or config.json to ask every plugin about"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    listing.set_defaults(handler=_cmd_list)

    inspect = commands.add_parser("inspect", help="describe a checkpoint directory")
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a readable block")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


# --- list -------------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    from automodel_plugins.registry import get_registry, pick_winner

    registry = get_registry()
    verdicts: list[ClaimVerdict] = []
    claimed_by: str | None = None
    problem: AutomodelPluginsError | None = None
    if args.config is not None:
        from automodel_plugins.config import load_config

        verdicts = registry.claims(load_config(args.config))
        try:
            claimed_by = pick_winner(verdicts)
        except AutomodelPluginsError as exc:
            problem = exc
    records = registry.plugins()
    if args.json:
        print(json.dumps(_list_document(records, verdicts, claimed_by), indent=2))
    else:
        decided = problem is None
        print(
            _list_table(records, verdicts, claimed_by, config_given=args.config is not None, decided=decided)
        )
    if problem is not None:
        print(f"automodel-plugins: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


def _list_document(
    records: Sequence[PluginRecord], verdicts: Sequence[ClaimVerdict], claimed_by: str | None
) -> dict[str, Any]:
    return {
        "plugins": [record.model_dump() for record in records],
        "claims": [_claim_row(v) for v in verdicts],
        "claimed_by": claimed_by,
    }


def _claim_row(verdict: ClaimVerdict) -> dict[str, Any]:
    row = verdict.model_dump(exclude={"error"})
    if verdict.error is not None:
        row["error"] = verdict.error
    return row


def _list_table(
    records: Sequence[PluginRecord],
    verdicts: Sequence[ClaimVerdict],
    claimed_by: str | None,
    *,
    config_given: bool,
    decided: bool,
) -> str:
    rows = [
        [r.name, r.distribution or "-", r.version or "-", r.status, ", ".join(r.hooks) or "-"]
        for r in records
    ]
    lines = _table(["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"], rows)
    if not records:
        lines.append("(no plugins loaded; AUTOMODEL_PLUGINS selects which installed plugins load)")
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "errors:", *(f"  {r.error}" for r in errors)]
    if config_given:
        claim_rows = [
            [v.plugin, _verdict_word(v), _or_dash(v.priority), v.error or v.reason or "-"] for v in verdicts
        ]
        lines += ["", *_table(["PLUGIN", "VERDICT", "PRIORITY", "REASON"], claim_rows)]
        nobody = "(none: stock transformers)" if decided else "(undecided: see the error)"
        lines.append(f"claimed by: {claimed_by or nobody}")
    return "\n".join(lines)


def _verdict_word(verdict: ClaimVerdict) -> str:
    if verdict.error is not None:
        return "error"
    return "claimed" if verdict.claimed else "declined"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


# --- inspect ----------------------------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    from automodel_plugins.inspect import describe_checkpoint

    description = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print("\n".join(_block(description)))
    return EXIT_OK


def _block(value: Any, indent: int = 0) -> list[str]:
    """A readable, YAML-like rendering of nested dicts and lists."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines: list[str] = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines += [f"{pad}{key}:", *_block(item, indent + 1)]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        return [line for item in value for line in _list_item(item, indent)]
    return [f"{pad}{_scalar(value)}"]


def _list_item(item: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(item, (dict, list)) and item:
        return [f"{pad}-", *_block(item, indent + 1)]
    return [f"{pad}- {_scalar(item)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return "null" if value is None else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
