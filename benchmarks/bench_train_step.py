"""Memory of one training step on the benchmark Mistral3 model: the plugin's fused-loss forward vs the stock one.

Both load the ~0.33B-parameter FP8 checkpoint of ``benchmarks/_checkpoint.py`` through
``automodel_plugins.from_pretrained`` (the same loader, so the same weights); ``fused`` keeps the plugin's forward
override with ``skip_logits=True`` (the loss from the final hidden states in chunks, no ``[tokens, vocab]`` logits),
``stock`` rebinds the class's own ``Mistral3ForConditionalGeneration.forward`` (full logits, then transformers'
``ForCausalLMLoss``). Each measurement is a fresh process (``--worker``), the two alternate, medians are shown.

The measured step: forward + backward of one 1 x ``--tokens`` text batch with labels (plus ``AdamW.step()`` with
``--adamw``), after the parameter gradients were allocated (zeros), so "step peak" is what the step adds on top of
weights + gradients: activations, logits, loss buffers. On CPU: peak RSS over the RSS right before the step
(``VmHWM`` reset through ``/proc/self/clear_refs``), with ``MALLOC_MMAP_THRESHOLD_=1 MiB`` so freed tensors go back
to the OS instead of hiding in glibc's cache; on CUDA: ``max_memory_allocated`` over ``memory_allocated``.

dtype: BF16 on CUDA and on CPUs with AVX512-BF16/AMX; float32 elsewhere (without them torch's CPU BF16 matmul
runs ~40x slower than float32, and one step of this model would take ~20 minutes).

    python benchmarks/bench_train_step.py                  # 1 x 512 tokens, 1 process per path
    python benchmarks/bench_train_step.py --repeats 3 --tokens 1024 --adamw [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import alternating, run_json_worker, worker_env

PATHS = ("fused", "stock")


def fast_cpu_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def worker(path_kind: str, checkpoint: str, tokens: int, device: str, dtype_name: str, adamw: bool) -> dict:
    import torch
    from _memory import PeakRss, status_kib

    import automodel_plugins

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = automodel_plugins.from_pretrained(
        checkpoint, dtype=dtype, device=device, skip_logits=(path_kind == "fused"), progress=False
    )
    if path_kind == "stock":
        model.forward = type(model).forward.__get__(model)
    model.train()
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(20, vocab, (1, tokens), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    gc.collect()
    cuda = device.startswith("cuda")
    loaded_kib = status_kib("VmRSS")
    loaded_cuda = torch.cuda.memory_allocated() if cuda else 0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if adamw else None

    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRss() as peak:
        started = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    if cuda:
        step_peak, method = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
        weights_and_grads = base - loaded_cuda
    else:
        step_peak, method = peak.extra_bytes, peak.method
        weights_and_grads = (peak.base_kib - loaded_kib) * 1024  # the gradients allocated above
    lm_grad = model.lm_head.weight.grad
    return {
        "path": path_kind,
        "seconds": seconds,
        "step_peak": step_peak,
        "grads_bytes": weights_and_grads,
        "loss": float(out.loss.detach()),
        "logits": out.logits is not None,
        "lm_head_grad_norm": float(lm_grad.float().norm()),
        "memory_method": method,
        "dtype": dtype_name,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_worker(path_kind: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        path_kind,
        "--path",
        str(checkpoint),
        "--tokens",
        str(args.tokens),
    ]
    cmd += ["--device", args.device, "--dtype", args.dtype] + (["--adamw"] if args.adamw else [])
    return run_json_worker(cmd, what=path_kind, env=worker_env(MALLOC_MMAP_THRESHOLD_=str(1 << 20)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="processes per path (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument(
        "--adamw", action="store_true", help="include AdamW.step() (first step: allocates its state)"
    )
    parser.add_argument("--path", type=Path, help="an existing checkpoint instead of the generated one")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") or fast_cpu_bf16() else "float32"
    if args.worker:
        print(
            json.dumps(worker(args.worker, str(args.path), args.tokens, args.device, args.dtype, args.adamw))
        )
        return 0

    try:
        from automodel_plugins.model.forward import fused_loss_forward  # noqa: F401
    except ImportError as exc:
        print(f"fused-loss forward not available yet ({exc}); skipping")
        return 0
    from _checkpoint import ensure_checkpoint

    checkpoint = args.path or ensure_checkpoint()
    results: dict[str, list[dict]] = {p: [] for p in PATHS}
    for repeat, path_kind in alternating(PATHS, args.repeats):
        row = run_worker(path_kind, checkpoint, args)
        results[path_kind].append(row)
        print(
            f"  run {repeat + 1} {path_kind:<5} step {row['seconds']:6.1f} s  step peak "
            f"+{row['step_peak'] / 2**20:6.0f} MiB  loss {row['loss']:.5f}",
            flush=True,
        )

    def med(p: str, key: str) -> float:
        return statistics.median(r[key] for r in results[p])

    first = results["fused"][0]
    what = "forward + backward" + (" + AdamW.step()" if args.adamw else "")
    print(
        f"\n{checkpoint.name}: {first['params'] / 1e9:.3f}B parameters, {first['dtype']} on {args.device}, "
        f"batch 1 x {args.tokens} tokens with labels, {what}, median of {args.repeats} process(es) per path"
    )
    print(f"memory: {first['memory_method']}, over weights + preallocated gradients")
    print("| path | step peak (MiB) | weights' grads (MiB) | step (s) | loss | logits returned |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in PATHS:
        print(
            f"| {p} | {med(p, 'step_peak') / 2**20:.0f} | {med(p, 'grads_bytes') / 2**20:.0f} | "
            f"{med(p, 'seconds'):.1f} | {results[p][0]['loss']:.5f} | {results[p][0]['logits']} |"
        )
    ratio = med("fused", "step_peak") / med("stock", "step_peak")
    loss_diff = abs(results["fused"][0]["loss"] - results["stock"][0]["loss"])
    grad_a, grad_b = results["fused"][0]["lm_head_grad_norm"], results["stock"][0]["lm_head_grad_norm"]
    print(f"\nstep peak fused / stock: {ratio:.3f}")
    print(f"|loss fused - loss stock| = {loss_diff:.2e}; lm_head grad norm {grad_a:.6g} vs {grad_b:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
