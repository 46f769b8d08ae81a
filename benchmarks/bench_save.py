r"""Saving the ~0.33B FP8 Mistral3 back in its own format: sharded (FSDP2, 2 ranks) and from one process.

**FSDP2, 2 CPU ranks (gloo).** Each rank runs the documented load (``build_model`` -> ``fully_shard`` each decoder
layer and the root -> ``to_empty`` -> ``load_weights``), then, after ``gc.collect()``, takes its baseline RSS
(``VmHWM`` reset through ``/proc/self/clear_refs``, verified; a 2 ms ``VmRSS`` sampler otherwise) and saves:

* ours: ``automodel_plugins.save_pretrained(model, dest)`` (``quantization="source"``: per-tensor FP8 as loaded),
  every rank writing its own shards;
* the peer, what users do today: ``get_model_state_dict(model, StateDictOptions(full_state_dict=True,
  cpu_offload=True))`` then ``model.save_pretrained(dest, state_dict=...)`` on rank 0 (BF16: stock
  transformers cannot write FP8 on CPU).

Reported per rank: peak over its baseline / the whole model's BF16 parameter bytes (target <= 0.10 for ours: each
rank already holds its half) and the bytes it wrote. Ours is checked to have written the source's tensors byte
for byte.

**One process.** ``from_pretrained`` once, then in rotation (``--repeats`` each, medians) ours
(``save_pretrained(model, dest)``: FP8 as loaded; by default every file is ``fsync``\ ed before the rename), ours
with ``fsync=False``, and stock ``model.save_pretrained(dest)`` (BF16, no fsync): the output bytes of ours /
stock's, the FP8 weights' bytes / their BF16 bytes (about 0.5), and the wall time ours / stock like for like
(``fsync=False``; target <= 1.0), the default's shown beside it. Before each timed save the previous run's dirty
pages are flushed (``os.sync()``, outside the timing): otherwise whichever saver runs when the kernel's dirty-page
limit is reached is throttled by the writeback of the others' files (stock's runs ranged 0.2-2.2 s that way).

    python benchmarks/bench_save.py                       # both parts, per-tensor FP8 (Ministral 3's format)
    python benchmarks/bench_save.py --part fsdp|single [--kind block] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRss
from _workers import run_json_worker, worker_env

FSDP_TARGET = 0.10
TIME_TARGET = 1.0
WORLD_SIZE = 2
SAVERS = ("ours", "peer")
SINGLE_SAVERS = ("ours", "ours-no-fsync", "stock")


# --- FSDP2: one rank (under torchrun) -----------------------------------------------------------------------


def fsdp_worker(saver: str, path: Path, dest: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import automodel_plugins

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = automodel_plugins.build_model(path)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path, progress=False)
    dist.barrier()
    written = 0
    with PeakRss() as peak:
        started = time.perf_counter()
        if saver == "ours":
            report = automodel_plugins.save_pretrained(model, dest, progress=False)
            written = report.bytes_written
        else:
            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if dist.get_rank() == 0:
                model.save_pretrained(dest, state_dict=state)
                written = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
            del state
        dist.barrier()
        seconds = time.perf_counter() - started
    row = {"rank": dist.get_rank(), "extra_bytes": peak.extra_bytes, "written": written, "seconds": seconds}
    row["method"] = peak.method
    (out / f"{saver}.rank{row['rank']}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(saver: str, path: Path, dest: Path, out: Path, timeout: float) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [__file__, "--fsdp-worker", saver, "--path", str(path), "--dest", str(dest), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOMODEL_PLUGINS_PROGRESS": "0", "TQDM_DISABLE": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun ({saver}) failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return [json.loads((out / f"{saver}.rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def tensor_digests(directory: Path) -> dict[str, str]:
    """Each tensor's bytes, hashed, by key (safetensors' own reader)."""
    import torch
    from safetensors import safe_open

    digests = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(key).contiguous().reshape(-1)
                data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
                digests[key] = hashlib.blake2b(data, digest_size=16).hexdigest()
    return digests


def run_fsdp(path: Path, model_bytes: int, timeout: float) -> bool:
    mib = 2**20
    rows = {}
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        for saver in SAVERS:
            dest = Path(scratch) / f"saved-{saver}"
            rows[saver] = launch(saver, path, dest, Path(scratch), timeout)
            if saver == "ours":
                identical = tensor_digests(dest) == tensor_digests(path)
            shutil.rmtree(dest, ignore_errors=True)
    print(
        f"\nFSDP2 save, {WORLD_SIZE} CPU ranks (gloo), {path.name}; whole model {model_bytes / mib:.0f} MiB in BF16; "
        f"memory: {rows['ours'][0]['method']}"
    )
    print("| saver | rank | peak over baseline (MiB) | peak / BF16 model | bytes written (MiB) | time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for saver in SAVERS:
        for row in rows[saver]:
            print(
                f"| {saver} | {row['rank']} | {row['extra_bytes'] / mib:.1f} | {row['extra_bytes'] / model_bytes:.3f} "
                f"| {row['written'] / mib:.1f} | {row['seconds']:.2f} |"
            )
    worst = {saver: max(r["extra_bytes"] for r in rows[saver]) / model_bytes for saver in SAVERS}
    checks = [
        (
            f"ours: worst rank peak / BF16 model        {worst['ours']:.3f}  (target <= {FSDP_TARGET:.2f})",
            worst["ours"] <= FSDP_TARGET,
        ),
        (
            f"peer: worst rank peak / BF16 model        {worst['peer']:.3f}  (the gather to rank 0, for reference)",
            True,
        ),
        ("ours: every tensor byte-identical to the source checkpoint", identical),
        ("ours: every rank wrote part of the checkpoint", all(r["written"] > 0 for r in rows["ours"])),
    ]
    for text, ok in checks:
        print(f"{text}  {'PASS' if ok else 'FAIL'}")
    return all(ok for _, ok in checks)


# --- one process -----------------------------------------------------------------------------------------


def single_worker(path: Path, repeats: int, scratch: Path) -> dict[str, Any]:
    import torch

    import automodel_plugins

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model = automodel_plugins.from_pretrained(path, progress=False)
    rows: dict[str, list[dict[str, float]]] = {saver: [] for saver in SINGLE_SAVERS}
    for repeat in range(repeats):
        shift = repeat % len(SINGLE_SAVERS)
        for saver in SINGLE_SAVERS[shift:] + SINGLE_SAVERS[:shift]:
            dest = scratch / f"{saver}-{repeat}"
            gc.collect()
            os.sync()  # the previous run's dirty pages, flushed outside the timing: no saver pays another's
            started, cpu = time.perf_counter(), time.process_time()
            if saver == "stock":
                model.save_pretrained(dest)
            else:
                automodel_plugins.save_pretrained(model, dest, progress=False, fsync=saver == "ours")
            row = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
            row["bytes"] = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
            row["tensor_bytes"], row["fp8_bytes"], row["fp8_elements"] = header_sizes(dest)
            rows[saver].append(row)
            shutil.rmtree(dest)
    return rows


def header_sizes(directory: Path) -> tuple[int, int, int]:
    """A checkpoint's tensor bytes, and its FP8 tensors' bytes and elements (from the headers)."""
    from automodel_plugins.checkpoint import Checkpoint

    with Checkpoint.open(directory) as checkpoint:
        infos = [checkpoint.info(key) for key in checkpoint]
    fp8 = [info for info in infos if info.dtype.itemsize == 1 and info.dtype.is_floating_point]
    return sum(i.nbytes for i in infos), sum(i.nbytes for i in fp8), sum(i.nbytes for i in fp8)


def run_single(path: Path, repeats: int) -> bool:
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        command = [
            sys.executable,
            __file__,
            "--single-worker",
            "--path",
            str(path),
            "--repeats",
            str(repeats),
        ]
        command += ["--out", scratch]
        rows = run_json_worker(command, what="single-process", env=worker_env(TQDM_DISABLE="1"))

    def med(saver: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[saver])

    mib = 2**20
    print(
        f"\nsingle-process save of {path.name} (median of {repeats}), load average {os.getloadavg()[0]:.1f}"
    )
    print("| saver | format | bytes (MiB) | wall (s) | cpu (s) | runs: wall (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    kinds = {"ours": "FP8 (source), fsync", "ours-no-fsync": "FP8 (source), fsync=False", "stock": "BF16"}
    for saver, kind in kinds.items():
        runs = ", ".join(f"{r['wall_s']:.2f}" for r in rows[saver])
        print(
            f"| {saver} | {kind} | {med(saver, 'bytes') / mib:.0f} | {med(saver, 'wall_s'):.2f} | {med(saver, 'cpu_s'):.2f} | {runs} |"
        )
    size_ratio = med("ours", "bytes") / med("stock", "bytes")
    source_bytes = header_sizes(path)[0]
    fp8_ratio = rows["ours"][0]["fp8_bytes"] / (2 * rows["ours"][0]["fp8_elements"])
    time_ratio = med("ours-no-fsync", "wall_s") / med("stock", "wall_s")
    durable_ratio = med("ours", "wall_s") / med("stock", "wall_s")
    cpu_ratio = med("ours", "cpu_s") / med("stock", "cpu_s")
    checks = [
        (
            f"bytes ours (FP8) / stock (BF16)   {size_ratio:.3f}  (the source's own tensors: its embeddings, "
            "head, vision tower and norms are BF16)",
            rows["ours"][0]["tensor_bytes"] == source_bytes,
        ),
        (f"FP8 weights: bytes / their BF16   {fp8_ratio:.3f}  (about 0.5)", fp8_ratio <= 0.51),
        (
            f"wall time ours / stock            {time_ratio:.3f}  (like for like: neither fsyncs; target <= "
            f"{TIME_TARGET})",
            time_ratio <= TIME_TARGET,
        ),
        (
            f"wall time ours (fsync) / stock    {durable_ratio:.3f}  (the default: every file on disk first)",
            True,
        ),
        (f"cpu time ours (fsync) / stock     {cpu_ratio:.3f}  (for reference)", True),
    ]
    for text, ok in checks:
        print(f"{text}  {'PASS' if ok else 'FAIL'}")
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "fsdp", "single"), default="all")
    parser.add_argument("--kind", default="per-tensor", choices=("per-tensor", "block"))
    parser.add_argument("--path", type=Path, help="an FP8 checkpoint directory (default: the benchmark's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--fsdp-worker", choices=SAVERS, help=argparse.SUPPRESS)
    parser.add_argument("--single-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.path, args.dest, args.out)
        return 0
    if args.single_worker:
        print(json.dumps(single_worker(args.path, args.repeats, args.out)))
        return 0
    from _checkpoint import bf16_parameter_bytes, ensure_checkpoint

    path = args.path or ensure_checkpoint(args.kind)
    passed = True
    if args.part in ("all", "fsdp"):
        passed &= run_fsdp(path, bf16_parameter_bytes(path), args.timeout)
    if args.part in ("all", "single"):
        passed &= run_single(path, args.repeats)
    print(f"\noverall: {'PASS' if passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
