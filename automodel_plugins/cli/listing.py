"""``automodel-plugins list``: the installed plugins and, with ``--config``, every plugin's verdict on it.

Without ``--config`` it imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from automodel_plugins.cli.exits import EXIT_OK, EXIT_USER_ERROR
from automodel_plugins.cli.hub import add_hub_options, hub_options
from automodel_plugins.cli.render import table
from automodel_plugins.errors import AutomodelPluginsError

if TYPE_CHECKING:
    from automodel_plugins.registry import ClaimVerdict, PluginRecord

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser("list", help="list installed plugins (and, with --config, their claims)")
    listing.add_argument(
        "--config",
        metavar="PATH",
        help="model directory, config.json or hub repo id to ask every plugin about",
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_hub_options(listing)
    listing.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from automodel_plugins.registry import get_registry, pick_winner

    registry = get_registry()
    verdicts: list[ClaimVerdict] = []
    claimed_by: str | None = None
    problem: AutomodelPluginsError | None = None
    if args.config is not None:
        from automodel_plugins.sources import HubOptions, load_config

        config = load_config(args.config, **hub_options(args))
        verdicts = registry.claims(config)
        try:
            claimed_by = pick_winner(verdicts)
            if claimed_by is None:
                from automodel_plugins.pipeline.load.preflight import check_headers_of

                check_headers_of(
                    args.config, config, stock=True, options=HubOptions(**hub_options(args))
                )  # what stock would get
        except AutomodelPluginsError as exc:
            problem = exc
    records = registry.plugins()
    if args.json:
        print(json.dumps(_list_document(records, verdicts, claimed_by), indent=2))
    else:
        if problem is None:
            nobody = "(none: stock transformers)"
        elif any(v.claimed or v.error for v in verdicts):
            nobody = "(undecided: see the error)"
        else:
            nobody = "(none, and stock transformers cannot load it: see the error)"
        print(_list_table(records, verdicts, claimed_by, config_given=args.config is not None, nobody=nobody))
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
    nobody: str,
) -> str:
    rows = [
        [r.name, r.distribution or "-", r.version or "-", r.status, ", ".join(r.hooks) or "-"]
        for r in records
    ]
    lines = table(["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"], rows)
    if not records:
        lines.append("(no plugins loaded; AUTOMODEL_PLUGINS selects which installed plugins load)")
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "errors:", *(f"  {r.error}" for r in errors)]
    if config_given:
        claim_rows = [
            [v.plugin, _verdict_word(v), _or_dash(v.priority), v.error or v.reason or "-"] for v in verdicts
        ]
        lines += ["", *table(["PLUGIN", "VERDICT", "PRIORITY", "REASON"], claim_rows)]
        lines.append(f"claimed by: {claimed_by or nobody}")
    return "\n".join(lines)


def _verdict_word(verdict: ClaimVerdict) -> str:
    if verdict.error is not None:
        return "error"
    return "claimed" if verdict.claimed else "declined"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
