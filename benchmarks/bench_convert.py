"""``automodel-plugins convert SRC DST --to bf16`` vs transformers' ``from_pretrained`` + ``save_pretrained``.

Both turn the ~0.33B FP8 Mistral3 checkpoint (``benchmarks/_checkpoint.py``) into a BF16 checkpoint. Each
measurement is a fresh process of this script (``--worker``); the two alternate and the table shows medians of
``--repeats`` each. Per process, after every import: ``gc.collect()``, baseline = ``VmRSS``, then the peak RSS
(``VmHWM`` reset through ``/proc/self/clear_refs``, verified; a 2 ms ``VmRSS`` sampler otherwise) over the call:

* ours: ``automodel_plugins.convert_checkpoint(SRC, DST, to="bf16")``, what the command runs: a chunk of rows
  of one tensor at a time, read with ``pread`` (nothing memory-mapped), written with ``pwrite``;
* transformers: ``Mistral3ForConditionalGeneration.from_pretrained(SRC, dtype=bfloat16)`` (which dequantizes on
  CPU) then ``save_pretrained(DST)``.

Targets: ours, peak over baseline / output bytes <= 0.15, and wall time ours / transformers <= 1.0. The driver also
checks that both wrote the same tensors, bit for bit (safetensors' own reader).

    python benchmarks/bench_convert.py [--repeats 3] [--kind block] [--path DIR]

``--kind native-moe`` measures ``convert`` of the MoE forms instead (Mistral Large 3's native form with FP8_BLOCK
experts, Mistral 4's HF fused and per-expert forms, Qwen3-VL-MoE per-expert): peak / output bytes and bytes read /
checkpoint bytes, against transformers where it reads the form (see ``benchmarks/_convert_moe.py``).

    python benchmarks/bench_convert.py --kind native-moe [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRss
from _workers import alternating, run_json_worker, worker_env

CONVERTERS = ("ours", "transformers")
MEMORY_TARGET = 0.15
TIME_TARGET = 1.0


def worker(converter: str, path: str, dest: str) -> dict:
    import torch
    from transformers import Mistral3ForConditionalGeneration

    import automodel_plugins
    import automodel_plugins.pipeline.save.convert

    with PeakRss() as peak:
        wall, cpu = time.perf_counter(), time.process_time()
        if converter == "ours":
            automodel_plugins.convert_checkpoint(path, dest, to="bf16", progress=False)
        else:
            model = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
            model.save_pretrained(dest)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    output = sum(f.stat().st_size for f in Path(dest).glob("*.safetensors"))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_bytes": peak.extra_bytes,
        "output_bytes": output,
        "method": peak.method,
        "digests": digests(Path(dest)),
    }


def digests(directory: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(key).contiguous().reshape(-1)
                data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
                out[key] = hashlib.blake2b(data, digest_size=16).hexdigest()
    return out


def run_worker(converter: str, path: Path, scratch: Path) -> dict:
    dest = scratch / f"out-{converter}"
    command = [sys.executable, __file__, "--worker", converter, "--path", str(path), "--dest", str(dest)]
    os.sync()  # the previous run's dirty pages, flushed before this one starts: no converter pays another's
    try:
        return run_json_worker(command, what=converter, env=worker_env(TQDM_DISABLE="1"))
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", default="per-tensor", choices=("per-tensor", "block", "native-moe"))
    parser.add_argument("--path", type=Path, help="an existing checkpoint instead of the generated one")
    parser.add_argument("--worker", choices=CONVERTERS, help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--worker-moe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_moe:
        from _convert_moe import worker as moe_worker

        print(json.dumps(moe_worker(args.worker_moe, args.worker, args.dest)))
        return 0
    if args.kind == "native-moe":
        from _convert_moe import run as run_moe

        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / ".cache") as scratch:
            return run_moe(__file__, args.repeats, Path(scratch))
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.path), args.dest)))
        return 0
    from _checkpoint import ensure_checkpoint

    path = args.path or ensure_checkpoint(args.kind)
    for file in sorted(path.glob("*.safetensors")):  # a warm page cache for both
        file.read_bytes()
    results: dict[str, list[dict]] = {c: [] for c in CONVERTERS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        for repeat, converter in alternating(CONVERTERS, args.repeats):
            row = run_worker(converter, path, Path(scratch))
            results[converter].append(row)
            print(
                f"  run {repeat + 1} {converter:<12} wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s  "
                f"peak +{row['peak_bytes'] / 2**20:6.0f} MiB",
                flush=True,
            )

    def med(converter: str, key: str) -> float:
        return statistics.median(r[key] for r in results[converter])

    mib = 2**20
    output = med("ours", "output_bytes")
    print(
        f"\nconvert {path.name} -> BF16 ({output / mib:.0f} MiB written), median of {args.repeats} processes each; "
        f"memory: {results['ours'][0]['method']}; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "| converter | wall (s) | cpu (s) | peak over baseline (MiB) | peak / output bytes | runs: wall (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for converter in CONVERTERS:
        runs = ", ".join(f"{r['wall_s']:.2f}" for r in results[converter])
        print(
            f"| {converter} | {med(converter, 'wall_s'):.2f} | {med(converter, 'cpu_s'):.2f} | "
            f"{med(converter, 'peak_bytes') / mib:.0f} | {med(converter, 'peak_bytes') / output:.3f} | {runs} |"
        )
    memory = med("ours", "peak_bytes") / output
    wall = med("ours", "wall_s") / med("transformers", "wall_s")
    same = results["ours"][0]["digests"] == results["transformers"][0]["digests"]
    checks = [
        (
            f"peak over baseline / output bytes (ours)  {memory:.3f}  (target <= {MEMORY_TARGET})",
            memory <= MEMORY_TARGET,
        ),
        (
            f"wall time ours / transformers            {wall:.3f}  (target <= {TIME_TARGET})",
            wall <= TIME_TARGET,
        ),
        ("both wrote the same tensors, bit for bit", same),
    ]
    print()
    for text, ok in checks:
        print(f"{text}  {'PASS' if ok else 'FAIL'}")
    print(f"overall: {'PASS' if all(ok for _, ok in checks) else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
