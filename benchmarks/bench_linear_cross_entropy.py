"""Forward + backward of an LM-head loss: stock vs torch's chunked ``F.linear_cross_entropy`` vs ours.

"stock" (``naive``) is what a transformers model does: ``x @ W.T`` in the head's dtype, then
``cross_entropy(logits.float())``. Each measurement runs in a fresh subprocess of this script (``--worker
PATH``), so one path's allocator state cannot flatter or hurt another; the paths alternate order across repeats
and the table shows medians (``--repeats`` up to 2048 tokens, ``--repeats-large`` above: those runs are long).
Extra peak memory is measured over the process's footprint right before the measured step (inputs and
already-allocated ``.grad`` buffers excluded): on CPU the RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``; a sampling thread where that is unavailable), on CUDA ``max_memory_allocated``.

    python benchmarks/bench_linear_cross_entropy.py            # N=4096 H=1024 V=65536 fp32, 3 repeats
    python benchmarks/bench_linear_cross_entropy.py --dtype bfloat16 --tokens 512,2048,8192
    python benchmarks/bench_linear_cross_entropy.py --quick    # small shape, for a smoke run
    python benchmarks/bench_linear_cross_entropy.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import alternating, run_json_worker

PATHS = ("naive", "torch_chunked", "ours")
DTYPES = ("float32", "bfloat16")
LARGE_N = 2048  # above this many tokens a run takes minutes: --repeats-large applies


def targets(dtype: str, n: int) -> tuple[tuple[str, str, str, str, float], ...]:
    """(label, numerator, denominator, metric, limit): issue 24's table for bf16 (extra peak <= 0.9 at 512
    tokens and <= 0.35 at 8192, time <= 1.0 at every N); for fp32 the original ones (0.10 and 1.10 vs naive)."""
    rows = [("time ours / torch chunked", "ours", "torch_chunked", "seconds", 1.00)]
    if dtype == "bfloat16":
        peak = {512: 0.9, 8192: 0.35}.get(n)
        if peak is not None:
            rows.append(("extra peak memory ours / stock", "ours", "naive", "extra_mb", peak))
        rows.append(("time ours / stock", "ours", "naive", "seconds", 1.00))
    else:
        rows.append(("extra peak memory ours / naive", "ours", "naive", "extra_mb", 0.10))
        rows.append(("time ours / naive", "ours", "naive", "seconds", 1.10))
    return tuple(rows[1:] + rows[:1])


# --- worker (one path, one process) -------------------------------------------------------------------


def _loss_fn(path: str, chunk_size: int | None = None) -> Callable:
    import torch
    import torch.nn.functional as F

    if path == "naive":  # stock: logits in the head's dtype, cross-entropy in fp32 (transformers' upcast)
        return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)
    if path == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)
    if path == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from automodel_plugins.ops import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(
            h, w, y, ignore_index=-100, chunk_size=chunk_size, loss_dtype=torch.float32
        )
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def _worker(args: argparse.Namespace) -> dict:
    import torch

    path, n, hidden, vocab, device = args.worker, args.n, args.hidden, args.vocab, args.device
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    h = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), device=device)
    y[::7] = -100  # 1 in 7 targets ignored (prompt / padding tokens)
    fn = _loss_fn(path, args.chunk_size)
    fn(h, w, y).backward()  # warm-up; also allocates h.grad and w.grad, which are excluded below
    h.grad.zero_()
    w.grad.zero_()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = fn(h, w, y)
        loss.backward()
        sync()
        seconds = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated() - base
        base_mb, method = base / 2**20, "cuda max_memory_allocated"
    else:
        from _memory import PeakRss

        with PeakRss() as peak:
            start = time.perf_counter()
            loss = fn(h, w, y)
            loss.backward()
            seconds = time.perf_counter() - start
        extra = peak.extra_bytes
        base_mb, method = peak.base_kib / 1024, peak.method
    return {
        "path": path,
        "seconds": seconds,
        "extra_mb": extra / 2**20,
        "base_mb": base_mb,
        "loss": loss.float().item(),
        "grad_w_norm": float(w.grad.norm()),
        "memory_method": method,
    }


# --- driver -------------------------------------------------------------------------------------------


def _run_worker(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--n", str(args.n), "--hidden", str(args.hidden)]
    cmd += ["--vocab", str(args.vocab), "--device", args.device, "--seed", str(args.seed)]
    cmd += ["--dtype", args.dtype, "--threads", str(args.threads)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return run_json_worker(cmd, what=path)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _report(results: dict[str, list[dict]], args: argparse.Namespace) -> bool:
    print(
        f"\nN={args.n} H={args.hidden} V={args.vocab} {args.dtype} on {args.device}, 1/7 targets ignored, "
        f"forward+backward, {args.threads or 'default'} threads, median of {len(next(iter(results.values())))} "
        f"(memory: {next(iter(results.values()))[0]['memory_method']})"
    )
    print("| path | time (s) | runs (s) | extra peak (MB) | base (MB) | loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path, rows in results.items():
        runs = ", ".join(f"{r['seconds']:.2f}" for r in rows)
        print(
            f"| {path} | {_median(rows, 'seconds'):.2f} | {runs} | {_median(rows, 'extra_mb'):.0f} | "
            f"{_median(rows, 'base_mb'):.0f} | {rows[0]['loss']:.6f} |"
        )
    all_pass = True
    print()
    for label, num, den, metric, limit in targets(args.dtype, args.n):
        if num not in results or den not in results:
            continue
        ratio = _median(results[num], metric) / max(_median(results[den], metric), 1e-9)
        ok = ratio <= limit
        all_pass &= ok
        runs = [r[metric] / max(d[metric], 1e-9) for r, d in zip(results[num], results[den], strict=False)]
        each = ", ".join(f"{x:.2f}" for x in runs)
        print(
            f"{label:<34} {ratio:6.3f}  (target <= {limit:.2f})  {'PASS' if ok else 'FAIL'}  (per repeat: {each})"
        )
    losses = [rows[0]["loss"] for rows in results.values()]
    print(f"max loss difference between paths: {max(losses) - min(losses):.2e}")
    return all_pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N=1024 H=256 V=16384")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-large", type=int, default=2, help=f"repeats above {LARGE_N} tokens")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="of the input and the head")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: torch's default, the core count)"
    )
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--tokens", default=None, help="comma-separated token counts N (one table each)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=None, help="override our op's chunk rows")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset to run")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default = (1024, 256, 16384) if args.quick else (4096, 1024, 65536)
    args.n, args.hidden, args.vocab = (
        v or d for v, d in zip((args.n, args.hidden, args.vocab), default, strict=True)
    )
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    paths = tuple(p for p in PATHS if p in args.paths.split(","))
    if not paths:
        parser.error(f"--paths must name some of {PATHS}")
    counts = [int(v) for v in args.tokens.split(",")] if args.tokens else [args.n]
    all_pass = True
    for n in counts:
        args.n = n
        repeats = args.repeats if n <= LARGE_N else args.repeats_large
        results: dict[str, list[dict]] = {p: [] for p in paths}
        for repeat, path in alternating(paths, repeats):
            row = _run_worker(path, args)
            results[path].append(row)
            print(
                f"N={n} repeat {repeat} {path:<14} {row['seconds']:7.2f} s  extra {row['extra_mb']:7.0f} MB",
                flush=True,
            )
        all_pass &= _report(results, args)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
