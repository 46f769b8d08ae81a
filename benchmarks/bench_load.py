"""Loading the FP8 Mistral3 checkpoint: ``automodel_plugins.from_pretrained`` vs transformers' own loader.

Both load the same ~0.33B-parameter FP8 checkpoint (``benchmarks/_checkpoint.py``, generated once) into the stock
``Mistral3ForConditionalGeneration`` in BF16 on CPU. Transformers dequantizes through its
``FineGrainedFP8Config(dequantize=True)`` path (automatic on CPU). Each measurement is a fresh process of this script
(``--worker``); the two loaders alternate, and the table shows medians of ``--repeats`` runs each.

Per process, after every import and right before the load: ``gc.collect()``, baseline = ``VmRSS``, the kernel's
high-water mark reset through ``/proc/self/clear_refs`` (checked; a 2 ms ``VmRSS`` sampling thread otherwise).
Peak = ``VmHWM`` - baseline (anonymous + file-backed pages, i.e. memory-mapped checkpoint pages this process
touched count too). Time = wall (and CPU) seconds of the load call alone. After measuring, the worker checks the
model is usable (no meta tensor, every float parameter BF16 on CPU, one text forward) and digests every tensor;
the driver requires ours and transformers' state dicts to be bit-identical and their next-token top-5 to match.
The shard files are read once beforehand so both loaders start from a warm page cache.

Targets: peak / BF16 parameter bytes <= 0.75 and <= transformers'; wall time ours / transformers <= 1.0.

    python benchmarks/bench_load.py                 # 3 processes per loader
    python benchmarks/bench_load.py --repeats 5 [--kind block] [--path DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRss, status_kib
from _workers import alternating, run_json_worker, worker_env

LOADERS = ("ours", "transformers")
PEAK_TARGET = 0.75
TIME_TARGET = 1.0


# --- worker: one load in this process ----------------------------------------------------------------------


def tensor_digest(tensor) -> str:
    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def worker(loader: str, path: str) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline, by both loaders)
    from transformers import Mistral3ForConditionalGeneration

    import automodel_plugins
    import automodel_plugins.pipeline.load.load

    with PeakRss() as peak:
        wall, cpu = time.perf_counter(), time.process_time()
        if loader == "ours":
            model = automodel_plugins.from_pretrained(path, dtype=torch.bfloat16, progress=False)
        else:
            model = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return loaded_facts(loader, model, peak, wall, cpu)


def loaded_facts(loader: str, model, peak: PeakRss, wall: float, cpu: float) -> dict:
    """What a worker reports about a load it measured: times, memory, and whether the model is usable."""
    import torch

    # Usable? Checked after measuring (digesting touches every memory-mapped page).
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    bad = [n for n, t in tensors.items() if t.is_meta or t.device.type != "cpu"]
    bad += [n for n, t in model.named_parameters() if t.is_floating_point() and t.dtype != torch.bfloat16]
    with torch.no_grad():
        ids = torch.arange(100, 116).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, -1].float()
    after_forward = (status_kib("VmRSS") - peak.base_kib) * 1024
    report = getattr(getattr(model, "automodel_composition", None), "load", None)
    return {
        "loader": loader,
        "class": type(model).__name__,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_bytes": peak.extra_bytes,
        "after_bytes": (peak.end_kib - peak.base_kib) * 1024,
        "after_forward_bytes": after_forward,
        "base_mib": peak.base_kib / 1024,
        "memory_method": peak.method,
        "bad_tensors": bad[:5],
        "digests": {n: tensor_digest(t) for n, t in sorted(model.state_dict().items())},
        "top5": logits.topk(5).indices.tolist(),
        "load_report": None
        if report is None
        else (
            f"{report.tensors} tensors: {report.dequantized} dequantized, {report.used_in_place} used in place "
            f"(memory-mapped), {report.converted} converted, {report.assembled} assembled from {report.pieces} "
            f"pieces, {len(report.dropped_keys)} activation scales dropped, {report.bytes_read / 2**20:.0f} MiB read"
        ),
    }


# --- driver ------------------------------------------------------------------------------------------------


def run_worker(loader: str, path: Path, script: str = __file__) -> dict:
    cmd = [sys.executable, script, "--worker", loader, "--path", str(path)]
    return run_json_worker(cmd, what=loader, env=worker_env(TQDM_DISABLE="1"))


def warm_page_cache(path: Path) -> None:
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def check_equal(results: dict[str, list[dict]]) -> list[str]:
    """Problems: a loader's model unusable, or the two models not bit-identical."""
    problems = []
    for loader, rows in results.items():
        for row in rows:
            if row["bad_tensors"]:
                problems.append(f"{loader}: tensors on meta / not cpu / not bf16: {row['bad_tensors']}")
    ours, theirs = results["ours"][0], results["transformers"][0]
    if set(ours["digests"]) != set(theirs["digests"]):
        problems.append(
            f"state dict keys differ: {sorted(set(ours['digests']) ^ set(theirs['digests']))[:5]}"
        )
    differ = [
        k for k in ours["digests"] if k in theirs["digests"] and ours["digests"][k] != theirs["digests"][k]
    ]
    if differ:
        problems.append(f"{len(differ)} tensor(s) differ, e.g. {differ[:3]}")
    if ours["top5"] != theirs["top5"]:
        problems.append(f"next-token top-5 differ: {ours['top5']} vs {theirs['top5']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="processes per loader (median)")
    parser.add_argument("--kind", default="per-tensor", choices=("per-tensor", "block"))
    parser.add_argument("--path", type=Path, help="an existing checkpoint instead of the generated one")
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.path))))
        return 0

    from _checkpoint import ensure_checkpoint

    path = args.path or ensure_checkpoint(args.kind)
    results, load_average = measure(path, args.repeats, __file__)
    report(results, path, args.repeats, load_average)
    return 0


def measure(
    path: Path, repeats: int, script: str, loaders: tuple[str, ...] = LOADERS
) -> tuple[dict[str, list[dict]], tuple[float, float]]:
    """``repeats`` fresh worker processes of ``script`` per loader, alternating, from a warm page cache; and
    the load average before and after."""
    warm_page_cache(path)
    results: dict[str, list[dict]] = {loader: [] for loader in loaders}
    before = os.getloadavg()[0]
    for repeat, loader in alternating(loaders, repeats):
        row = run_worker(loader, path, script)
        results[loader].append(row)
        print(
            f"  run {repeat + 1} {loader:<12} wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s  "
            f"peak +{row['peak_bytes'] / 2**20:6.0f} MiB",
            flush=True,
        )
    return results, (before, os.getloadavg()[0])


def report(
    results: dict[str, list[dict]],
    path: Path,
    repeats: int,
    load_average: tuple[float, float],
    *,
    extra_checks: list[tuple[str, bool]] = (),
) -> bool:
    """The table and the PASS/FAIL lines against the targets (plus ``extra_checks``); True when all pass."""
    from _checkpoint import bf16_parameter_bytes

    model_bytes = bf16_parameter_bytes(path)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    load_before, load_after = load_average

    def med(loader: str, key: str) -> float:
        return statistics.median(r[key] for r in results[loader])

    print(
        f"\ncheckpoint: {path.name} ({disk / 2**20:.0f} MiB on disk, {model_bytes / 2 / 1e9:.3f}B parameters = "
        f"{model_bytes / 2**20:.0f} MiB in BF16), bf16 on cpu, torch threads {_threads()}, "
        f"median of {repeats} processes each"
    )
    print(
        f"memory: {results['ours'][0]['memory_method']}; load average {load_before:.1f} -> {load_after:.1f}"
    )
    print(
        "| loader | wall (s) | cpu (s) | peak over baseline (MiB) | peak / BF16 params | RSS after load (MiB) "
        "| RSS after 1 forward (MiB) | runs: wall (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for loader in LOADERS:
        runs = ", ".join(f"{r['wall_s']:.2f}" for r in results[loader])
        print(
            f"| {loader} | {med(loader, 'wall_s'):.2f} | {med(loader, 'cpu_s'):.2f} | "
            f"{med(loader, 'peak_bytes') / 2**20:.0f} | {med(loader, 'peak_bytes') / model_bytes:.3f} | "
            f"{med(loader, 'after_bytes') / 2**20:.0f} | {med(loader, 'after_forward_bytes') / 2**20:.0f} | {runs} |"
        )
    ours_peak = med("ours", "peak_bytes") / model_bytes
    theirs_peak = med("transformers", "peak_bytes") / model_bytes
    wall_ratio = med("ours", "wall_s") / med("transformers", "wall_s")
    cpu_ratio = med("ours", "cpu_s") / med("transformers", "cpu_s")
    problems = check_equal(results)
    checks = [
        (
            f"peak / BF16 params (ours)              {ours_peak:6.3f}  (target <= {PEAK_TARGET})",
            ours_peak <= PEAK_TARGET,
        ),
        (
            f"peak / BF16 params ours vs transformers {ours_peak:6.3f} vs {theirs_peak:.3f}  (no worse)",
            ours_peak <= theirs_peak,
        ),
        (
            f"wall time ours / transformers          {wall_ratio:6.3f}  (target <= {TIME_TARGET})",
            wall_ratio <= TIME_TARGET,
        ),
        (
            "models bit-identical, top-5 equal" + (f": {'; '.join(problems)}" if problems else ""),
            not problems,
        ),
        *extra_checks,
    ]
    print()
    for text, ok in checks:
        print(f"{text}  {'PASS' if ok else 'FAIL'}")
    print(f"(cpu time ours / transformers            {cpu_ratio:6.3f}, for reference)")
    print(f"ours: {results['ours'][0]['load_report']}")
    passed = all(ok for _, ok in checks)
    print(f"overall: {'PASS' if passed else 'FAIL'}")
    return passed


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
