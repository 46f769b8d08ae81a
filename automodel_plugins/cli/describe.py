"""``automodel-plugins inspect``: what loading a checkpoint would do, from its config and headers alone (for a
hub repo id: ``config.json`` and the index downloaded, the shards' headers read with range requests)."""

from __future__ import annotations

import argparse
import json

from automodel_plugins.cli.exits import EXIT_OK
from automodel_plugins.cli.hub import add_hub_options, hub_options
from automodel_plugins.cli.render import block, table

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="describe a checkpoint directory or hub repo id (no tensor data is read or downloaded)",
    )
    inspect.add_argument("path", metavar="PATH", help="checkpoint directory (or file in one), or hub repo id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a readable block")
    plan = inspect.add_argument_group(
        "memory plan", "with --layout: the bytes each rank reads and holds after the load (headers only)"
    )
    plan.add_argument("--layout", metavar="fsdp=N,tp=N,ep=N", help="parallel degrees (missing ones are 1)")
    residency = plan.add_mutually_exclusive_group()
    residency.add_argument(
        "--fp8-resident", dest="dequantize", action="store_false", help="plan dequantize=False"
    )
    residency.add_argument(
        "--dequantize", dest="dequantize", action="store_true", help="plan dequantize=True (default)"
    )
    plan.add_argument(
        "--lora-r", type=int, default=0, metavar="R", help="add PEFT LoRA of rank R (fp32, Adam)"
    )
    plan.add_argument(
        "--lora-targets",
        default="q_proj,v_proj,q_b_proj,kv_b_proj",  # memory_plan.LORA_TARGETS (not imported: torch)
        metavar="NAMES",
        help="LoRA target_modules, comma-separated (default: q/v and MLA's q_b/kv_b, where the model has them)",
    )
    plan.add_argument(
        "--lora-target-parameters",
        default="",
        metavar="NAMES",
        help="LoRA target_parameters (fused expert tensors, e.g. mlp.experts.gate_up_proj), comma-separated",
    )
    plan.add_argument(
        "--expert-tp",
        action="store_true",
        help="with tp: the experts split over tp by the intermediate dim (parallelize_experts_tp)",
    )
    inspect.set_defaults(dequantize=True)
    add_hub_options(inspect)
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from automodel_plugins.pipeline.load.describe import describe_checkpoint

    if args.layout:
        return run_plan(args)
    description = describe_checkpoint(args.path, **hub_options(args))
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print("\n".join(block(description)))
    return EXIT_OK


def run_plan(args: argparse.Namespace) -> int:
    from automodel_plugins.pipeline.load.memory_plan import Layout, plan_memory
    from automodel_plugins.sources import HubOptions

    layout = Layout.parse(args.layout)
    plan = plan_memory(
        args.path,
        fsdp=layout.fsdp,
        tp=layout.tp,
        ep=layout.ep,
        dequantize=args.dequantize,
        lora_r=args.lora_r,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
        lora_target_parameters=tuple(t for t in args.lora_target_parameters.split(",") if t),
        hub=HubOptions(**hub_options(args)),
        expert_tp=args.expert_tp,
    )
    summary = plan.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    print("\n".join(plan_lines(summary)))
    return EXIT_OK


def _gb(nbytes: int) -> str:
    """Decimal units, as GPU memory is quoted (80 GB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def plan_lines(summary: dict) -> list[str]:
    """A table of every rank (read, weights by kind, LoRA, total), then the worst rank and the total."""
    ranks = summary["ranks"]
    kinds = sorted({kind for rank in ranks for kind in rank["held"]})
    rows = [
        [
            str(r["rank"]),
            _gb(r["read"]),
            *(_gb(r["held"].get(k, 0)) for k in kinds),
            _gb(sum(r["lora"].values())),
            _gb(r["total"]),
        ]
        for r in ranks
    ]
    load = "FP8-resident" if not summary["dequantize"] else "dequantized"
    lora = summary["lora"]
    head = [
        f"{summary['path']}: {summary['world_size']} ranks ("
        + ",".join(f"{k}={v}" for k, v in summary["layout"].items())
        + f"), {load}"
        + (
            f", LoRA r={lora['r']} on {','.join(lora['targets'] + lora['target_parameters'])} ({lora['optimizer']})"
            if lora
            else ""
        ),
    ]
    worst = summary["worst_rank"]
    return [
        *head,
        *table(["rank", "read", *kinds, "lora", "total"], rows),
        f"worst rank {worst['rank']}: {_gb(worst['total'])}; all ranks: {_gb(summary['total']['total'])}",
        f"not counted: {summary['not_counted']}",
    ]
