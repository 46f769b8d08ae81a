"""Per-rank memory and disk reads of the FSDP2 load of the ~0.35B FP8 Mistral3 checkpoint, 2 CPU ranks (gloo).

Each rank runs the documented flow: ``build_model`` (meta) -> ``fully_shard`` every decoder layer and the root
-> ``to_empty(device="cpu")`` -> ``load_weights`` (each rank reads and dequantizes only its own slices). Per
rank, after every import and the process group's start: ``gc.collect()``, baseline = ``VmRSS``, the kernel's
high-water mark reset through ``/proc/self/clear_refs`` (checked: a failed reset leaves ``VmHWM`` above
``VmRSS``; a 2 ms ``VmRSS`` sampling thread then). Peak = ``VmHWM`` - baseline over build_model .. load_weights.

Reported per rank: peak / the whole model's BF16 parameter bytes (target <= 0.60; 0.5 is the floor, the rank's
half of the weights), the bytes ``load_weights`` read from the checkpoint (``LoadReport.bytes_read``) and the
bytes the process read through ``read``/``pread`` system calls during the load (``rchar`` of ``/proc/self/io``),
against the checkpoint's size. The checkpoint comes from ``benchmarks/_checkpoint.py`` (generated once).

    python benchmarks/bench_distributed_load.py                  # per-tensor FP8 (Ministral 3's format)
    python benchmarks/bench_distributed_load.py --kind block     # 128x128 block scales
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRss, status_kib

TARGET = 0.60
FLOOR = 0.50
WORLD_SIZE = 2


# --- I/O counter ---------------------------------------------------------------------------------------


def io_counter(field: str) -> int:
    """A field of ``/proc/self/io`` (``rchar``: bytes read by read-like system calls, page cache or not)."""
    text = Path("/proc/self/io").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE).group(1))


# --- one rank (under torchrun) ------------------------------------------------------------------------


def _prepare(path: Path) -> Any:
    """Every import the load needs, so the baseline holds them: the mesh, FSDP2, the stock model class."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    from automodel_plugins.model.stock import stock_class
    from automodel_plugins.sources import load_config

    dist.init_process_group("gloo")
    stock_class(load_config(path))  # imports the transformers modeling module
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _load(path: Path, mesh: Any) -> tuple[Any, Any]:
    """The measured flow: build on meta, shard, materialize, load this rank's slices."""
    from torch.distributed.fsdp import fully_shard

    import automodel_plugins

    model = automodel_plugins.build_model(path)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    return model, automodel_plugins.load_weights(model, path)


def _local_parameter_bytes(model: Any) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def worker(path: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    mesh = _prepare(path)
    dist.barrier()
    rchar = io_counter("rchar")
    with PeakRss() as peak:
        started = time.perf_counter()
        model, report = _load(path, mesh)
        seconds = time.perf_counter() - started
    row = {
        "rank": dist.get_rank(),
        "base_mib": peak.base_kib / 1024,
        "extra_bytes": peak.extra_bytes,
        "after_bytes": (status_kib("VmRSS") - peak.base_kib) * 1024,
        "local_param_bytes": _local_parameter_bytes(model),
        "bytes_read": report.bytes_read,
        "rchar": io_counter("rchar") - rchar,
        "seconds": seconds,
        "method": peak.method,
    }
    (out / f"rank{row['rank']}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


# --- driver ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(path: Path, out: Path, timeout: float) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [__file__, "--worker", "--path", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOMODEL_PLUGINS_PROGRESS": "0"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def report(rows: list[dict[str, Any]], path: Path, model_bytes: int, kind: str) -> bool:
    mib = 2**20
    size = checkpoint_bytes(path)
    print(
        f"\nFSDP2 load, {WORLD_SIZE} CPU ranks (gloo): {path.name} ({kind} FP8, {size / mib:.0f} MiB on disk), "
        f"whole model {model_bytes / mib:.0f} MiB in BF16; memory: {rows[0]['method']}"
    )
    print(
        "| rank | peak over baseline (MiB) | peak / BF16 model | RSS after load (MiB) | local params (MiB) "
        "| read by load_weights (MiB) | read() syscalls (MiB) | share of checkpoint | time (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    passed = True
    for row in rows:
        ratio = row["extra_bytes"] / model_bytes
        passed &= ratio <= TARGET
        print(
            f"| {row['rank']} | {row['extra_bytes'] / mib:.0f} | {ratio:.3f} | {row['after_bytes'] / mib:.0f} "
            f"| {row['local_param_bytes'] / mib:.0f} | {row['bytes_read'] / mib:.1f} | {row['rchar'] / mib:.1f} "
            f"| {row['bytes_read'] / size:.3f} | {row['seconds']:.2f} |"
        )
    worst = max(row["extra_bytes"] for row in rows) / model_bytes
    print(
        f"\nworst rank peak / BF16 model bytes  {worst:.3f}  (target <= {TARGET:.2f}, floor {FLOOR:.2f})  "
        f"{'PASS' if passed else 'FAIL'}"
    )
    total = sum(row["bytes_read"] for row in rows)
    print(f"bytes read by all ranks together: {total / mib:.1f} MiB = {total / size:.3f} x the checkpoint")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", default="per-tensor", choices=["per-tensor", "block"])
    parser.add_argument("--path", type=Path, help="an FP8 checkpoint directory (default: the benchmark's)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.path, args.out)
        return 0
    from _checkpoint import bf16_parameter_bytes, ensure_checkpoint

    path = args.path or ensure_checkpoint(args.kind)
    with tempfile.TemporaryDirectory() as out:
        launch(path, Path(out), args.timeout)
        rows = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return 0 if report(rows, path, bf16_parameter_bytes(path), args.kind) else 1


if __name__ == "__main__":
    sys.exit(main())
