"""``automodel-plugins convert SRC DST --to {bf16,fp8-tensor,fp8-block}``: rewrite a checkpoint, streaming.

One tensor (a chunk of rows of it) at a time through the same adapter, plan and writer as loading and
``save_pretrained``; never a whole tensor, let alone the model, in memory. A progress bar on a terminal (the
loader's switch: ``--no-progress`` or ``AUTOMODEL_PLUGINS_PROGRESS=0`` turn it off).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from automodel_plugins.cli.exits import EXIT_OK
from automodel_plugins.cli.hub import add_hub_options, hub_options
from automodel_plugins.errors import SaveOptionError

__all__ = ["add_parser"]

_FORMATS = ("bf16", "fp8-tensor", "fp8-block")


def add_parser(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert",
        help="rewrite a checkpoint as BF16 or FP8 (streaming)",
        description="Rewrite the checkpoint SRC into the new directory DST, one tensor chunk at a time.",
    )
    convert.add_argument(
        "source",
        metavar="SRC",
        help="checkpoint directory (or its weights file, index, config), or a hub repo id",
    )
    convert.add_argument(
        "dest", metavar="DST", help="directory to create (refused if it exists and is not empty)"
    )
    convert.add_argument(
        "--to",
        required=True,
        choices=_FORMATS,
        help="bf16: plain BF16, what stock save_pretrained writes; fp8-tensor / fp8-block: transformers' FP8 format",
    )
    convert.add_argument(
        "--block", type=int, metavar="N", help="block size of fp8-block (default 128: 128x128)"
    )
    convert.add_argument(
        "--max-shard-size", metavar="S", help="largest shard file, e.g. 5GB (default transformers' own, 50GB)"
    )
    convert.add_argument(
        "--not-convert",
        action="append",
        metavar="MODULE",
        help="a module the FP8 formats keep unquantized (repeatable; default the source's list, else "
        "transformers' default)",
    )
    convert.add_argument(
        "--layout",
        choices=("hf", "native"),
        default="hf",
        help="hf (default): transformers' form (config.json, HF names); native: Mistral's native form "
        "(params.json, consolidated shards, native names and scales), from either form, with any --to",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync before the final rename (faster; not power-loss safe)",
    )
    add_hub_options(convert)
    convert.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from automodel_plugins.pipeline.save.convert import convert_checkpoint

    if args.block is not None and args.to != "fp8-block":
        raise SaveOptionError("--block applies to --to fp8-block")
    report = convert_checkpoint(
        args.source,
        args.dest,
        to=args.to,
        layout=args.layout,
        block_size=args.block,
        modules_to_not_convert=args.not_convert,
        max_shard_size=_shard_size(args.max_shard_size),
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        fsync=not args.no_fsync,
        **hub_options(args),
    )
    quantized = (
        f", {report.quantized} FP8 ({report.scales_kept} with the source's scales)"
        if report.quantized
        else ""
    )
    print(
        f"wrote {report.path}: {len(report.files)} files, {report.bytes / 2**20:.1f} MiB, "
        f"{report.tensors} tensors{quantized}, in {_command_seconds(started):.1f} s"
    )
    return EXIT_OK


def _command_seconds(started: float) -> float:
    """The command's wall time so far: since the process started (Linux: ``/proc/self/stat``, to 10 ms), so the
    interpreter's start and torch's and transformers' import count as the user waited for them; elsewhere since
    ``started`` (``time.perf_counter()`` when the command began, imports included)."""
    since_started = time.perf_counter() - started
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, "starttime", in ticks since boot
        since_process = time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError, AttributeError):
        return since_started
    return max(since_process, since_started)


def _shard_size(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isascii() and value.isdigit() else value
