"""One LoRA training step on an FP8-resident base (``dequantize=False``) vs the same step on the dequantized base.

Both load the ~0.33B-parameter FP8 checkpoint of ``benchmarks/_checkpoint.py`` through
``automodel_plugins.from_pretrained`` (the plugin's fused-loss forward, ``skip_logits=True``); ``resident`` keeps
the 28 text-stack FP8 linears as ``Fp8Linear`` (1 byte a parameter + scales, dequantized one layer at a time),
``dequantized`` loads them in the compute dtype. Then the same LoRA (r=16, alpha 32, on q/k/v/o and gate/up/down:
the projector and vision tower, BF16 and not FP8, are not targeted), and one step on a 1 x ``--tokens`` text batch
with labels: forward, backward, ``AdamW.step()``.

Each measurement is a fresh process (``--worker``); the two paths alternate, medians are shown. Memory on CPU:
peak RSS over the baseline taken after the imports, over the load, the LoRA wrapping and the first step
(``VmHWM`` reset through ``/proc/self/clear_refs``; ``MALLOC_MMAP_THRESHOLD_=1 MiB`` so freed tensors go back to
the OS); the memory-mapped checkpoint pages a path touches count too. On CUDA (``--device cuda``): the load
happens on the device, and the figure is ``max_memory_allocated``. Time: the median of ``--steps`` further steps
(the first one allocates the optimizer state). Resident bytes: parameters + buffers after loading.

dtype: BF16 on CUDA and on CPUs with AVX512-BF16/AMX, float32 elsewhere (as ``bench_train_step.py``).
Targets: peak resident / peak dequantized <= 0.65; step time resident / dequantized <= 1.5.

    python benchmarks/bench_fp8_resident.py                   # per-tensor scales, 1 process per path
    python benchmarks/bench_fp8_resident.py --kind block --repeats 3 [--dtype float32] [--device cuda]
    python benchmarks/bench_fp8_resident.py --kind moe --tokens 256 --repeats 3

    python benchmarks/bench_fp8_resident.py --kind moe --lora-experts --tokens 256 --repeats 3

``--kind moe`` runs the MoE of ``bench_moe_load.py`` (experts ``Fp8Experts``, LoRA on the attention) with each
``experts_implementation`` in the same run: ``resident`` (``grouped_mm``: hit experts dequantized into a reused
buffer, one grouped matmul) and ``resident-eager`` (the exact eager loop) against ``dequantized`` (stock's
``grouped_mm``, its default and fastest on CPU) and ``dequantized-eager``. Target for the MoE: step time
resident / dequantized (``grouped_mm``) <= 1.2.

``--lora-experts`` (with ``--kind moe``) adds LoRA on the experts themselves (``target_parameters`` on both fused
tensors, r=16 per expert) and runs ``resident`` and ``dequantized`` only, both ``grouped_mm``: on the dequantized
model stock PEFT parametrizes each fused tensor (``W + B @ A`` for every expert, kept for backward), on the
resident one the delta is added to each run of hit experts as they are dequantized
(``automodel_plugins.model.fp8_experts_delta``). ``step_peak`` is the first step's peak over the RSS before it
(the adapters, their gradients, AdamW's state, activations and whatever the step keeps), beside the load + step
peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import alternating, run_json_worker, worker_env

PATHS = ("resident", "dequantized")
MOE_PATHS = ("resident", "dequantized", "resident-eager", "dequantized-eager")
"""``--kind moe``: each path with the experts_implementation its suffix names (none: ``grouped_mm``)."""
PEAK_TARGET = 0.65
TIME_TARGET = 1.5
MOE_TIME_TARGET = 1.2
TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
"""``--lora-experts``: PEFT ``target_parameters`` on the fused expert tensors, as one writes it for the stock model."""


def worker(path_kind: str, checkpoint: str, args: argparse.Namespace) -> dict:
    import peft
    import torch
    from _memory import PeakRss

    import automodel_plugins
    from automodel_plugins.model.fp8_experts import Fp8Experts
    from automodel_plugins.model.fp8_linear import Fp8Linear

    dtype, device = getattr(torch, args.dtype), args.device
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    vocab = automodel_plugins.load_config(checkpoint).text_config.vocab_size
    vocab_ids = torch.randint(20, vocab, (1, args.tokens))
    batch = {
        "input_ids": vocab_ids,
        "attention_mask": torch.ones_like(vocab_ids),
        "labels": vocab_ids.clone(),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    with PeakRss() as peak:  # load + LoRA wrapping; the first step is measured on its own, then combined
        started = time.perf_counter()
        model = automodel_plugins.from_pretrained(
            checkpoint,
            dtype=dtype,
            device=device,
            dequantize=not path_kind.startswith("resident"),
            skip_logits=True,
            progress=False,
        )
        if args.kind == "moe":
            model.set_experts_implementation("eager" if path_kind.endswith("-eager") else "grouped_mm")
        load_seconds = time.perf_counter() - started
        resident_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        config = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=TEXT_TARGETS,
            target_parameters=EXPERT_TARGETS if args.lora_experts else None,
            lora_dropout=0.0,
        )
        model = peft.get_peft_model(model, config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if cuda:
        load_peak, before_step = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as step_peak:
        first = _step(model, optimizer, batch, cuda)
    if cuda:
        step_max = torch.cuda.max_memory_allocated()
        total_peak, first_step = max(load_peak, step_max) - cuda_base, step_max - before_step
    else:  # both peaks over the baseline taken before the load
        total_peak = (max(peak.peak_kib, step_peak.peak_kib) - peak.base_kib) * 1024
        first_step = step_peak.extra_bytes
    seconds = [_step(model, optimizer, batch, cuda)[1] for _ in range(args.steps)]
    return {
        "path": path_kind,
        "peak": total_peak,
        "step_peak": first_step,
        "memory_method": "cuda max_memory_allocated" if cuda else peak.method,
        "resident_bytes": resident_bytes,
        "load_seconds": load_seconds,
        "first_step_seconds": first[1],
        "step_seconds": statistics.median(seconds),
        "loss": first[0],
        "fp8_layers": sum(isinstance(m, (Fp8Linear, Fp8Experts)) for m in model.modules()),
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": args.dtype,
        "experts_implementation": model.config.get_text_config()._experts_implementation
        if args.kind == "moe"
        else None,
    }


def layer_worker(checkpoint: str, args: argparse.Namespace) -> dict:
    """One MoE layer's experts alone, forward + backward (input and routing-weight gradients) on the routing
    its router gives the batch's embeddings: the resident experts (grouped, eager) and the same experts
    dequantized (stock grouped_mm, eager), interleaved in one process, median of ``--layer-repeats``."""
    import torch

    import automodel_plugins
    from automodel_plugins.model.fp8_experts import Fp8Experts

    dtype = getattr(torch, args.dtype)
    model = automodel_plugins.from_pretrained(
        checkpoint, dtype=dtype, dequantize=False, skip_logits=True, progress=False
    )
    name, resident = next((n, m) for n, m in model.named_modules() if isinstance(m, Fp8Experts))
    block = model.get_submodule(name.removesuffix(".experts"))
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    stock = Qwen3VLMoeTextExperts(resident.config).to(dtype)
    stock.config = copy_config = type(resident.config).from_dict(resident.config.to_dict())
    for projection in ("gate_up_proj", "down_proj"):
        setattr(stock, projection, torch.nn.Parameter(resident.dequantized(projection), requires_grad=False))
    torch.manual_seed(0)
    vocab = resident.config.vocab_size
    ids = torch.randint(20, vocab, (args.tokens,))
    hidden = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(hidden)
    upstream = torch.randn_like(hidden)

    def once(module) -> float:
        x = hidden.clone().requires_grad_(True)
        w = top_k_weights.detach().clone().requires_grad_(True)
        started = time.perf_counter()
        module(x, top_k_index, w).backward(upstream)
        return time.perf_counter() - started

    paths = {
        "resident grouped_mm": (resident, resident.config, "grouped_mm"),
        "dequantized grouped_mm": (stock, copy_config, "grouped_mm"),
        "resident eager": (resident, resident.config, "eager"),
        "dequantized eager": (stock, copy_config, "eager"),
    }
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    for repeat in range(args.layer_repeats + 1):
        for path, (module, config, implementation) in paths.items():
            config._experts_implementation = implementation
            elapsed = once(module)
            if repeat:  # the first round warms up (buffers, allocator)
                seconds[path].append(elapsed)
    return {p: statistics.median(v) for p, v in seconds.items()}


def _step(model, optimizer, batch, cuda: bool) -> tuple[float, float]:
    import torch

    started = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    gc.collect()
    return float(loss.detach()), time.perf_counter() - started


def run_worker(path_kind: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path_kind, "--path", str(checkpoint)]
    cmd += [
        "--kind",
        args.kind,
        "--tokens",
        str(args.tokens),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if args.lora_experts:
        cmd.append("--lora-experts")
    return run_json_worker(cmd, what=path_kind, env=worker_env(MALLOC_MMAP_THRESHOLD_=str(1 << 20)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", default="per-tensor", choices=("per-tensor", "block", "moe"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first (median)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per path (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--path", type=Path, help="an existing checkpoint instead of the generated one")
    parser.add_argument(
        "--layer-repeats", type=int, default=9, help="--kind moe: timed rounds of the one-layer measurement"
    )
    parser.add_argument(
        "--lora-experts",
        action="store_true",
        help="--kind moe: LoRA on the fused experts too (target_parameters)",
    )
    parser.add_argument("--worker", choices=(*MOE_PATHS, "layer"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora_experts and args.kind != "moe":
        parser.error("--lora-experts needs --kind moe")
    if args.dtype == "auto":
        from bench_train_step import fast_cpu_bf16

        args.dtype = "bfloat16" if args.device.startswith("cuda") or fast_cpu_bf16() else "float32"
    if args.worker == "layer":
        print(json.dumps(layer_worker(str(args.path), args)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.path), args)))
        return 0
    from _checkpoint import ensure_checkpoint, ensure_moe_checkpoint

    checkpoint = args.path or (
        ensure_moe_checkpoint() if args.kind == "moe" else ensure_checkpoint(args.kind)
    )
    paths = PATHS if args.kind != "moe" or args.lora_experts else MOE_PATHS
    results: dict[str, list[dict]] = {p: [] for p in paths}
    for repeat, path_kind in alternating(paths, args.repeats):
        row = run_worker(path_kind, checkpoint, args)
        results[path_kind].append(row)
        print(
            f"  run {repeat + 1} {path_kind:<17} peak +{row['peak'] / 2**20:6.0f} MiB  "
            f"first step +{row['step_peak'] / 2**20:6.0f} MiB  resident "
            f"{row['resident_bytes'] / 2**20:6.0f} MiB  step {row['step_seconds']:6.2f} s  "
            f"loss {row['loss']:.5f}  load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    def med(p: str, key: str) -> float:
        return statistics.median(r[key] for r in results[p])

    first = results["resident"][0]
    lora_on = "the text projections and the fused experts" if args.lora_experts else "the text projections"
    print(
        f"\n{checkpoint.name}: {first['dtype']} on {args.device}, LoRA r=16 on {lora_on} "
        f"({first['lora_params'] / 1e6:.2f}M trainable), 1 x {args.tokens} tokens, forward + backward + AdamW, "
        f"median of {args.repeats} process(es) per path; memory: {first['memory_method']}"
    )
    print(
        "| path | experts | FP8 layers | resident (MiB) | peak, load + step (MiB) | peak, first step (MiB) "
        "| load (s) | step (s) | loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in paths:
        print(
            f"| {p} | {results[p][0].get('experts_implementation') or '-'} | {results[p][0]['fp8_layers']} | "
            f"{med(p, 'resident_bytes') / 2**20:.0f} | "
            f"{med(p, 'peak') / 2**20:.0f} | {med(p, 'step_peak') / 2**20:.0f} | {med(p, 'load_seconds'):.1f} | {med(p, 'step_seconds'):.2f} | "
            f"{results[p][0]['loss']:.5f} |"
        )
    peak_ratio = med("resident", "peak") / med("dequantized", "peak")
    time_ratio = med("resident", "step_seconds") / med("dequantized", "step_seconds")
    resident_ratio = med("resident", "resident_bytes") / med("dequantized", "resident_bytes")
    loss_diff = abs(results["resident"][0]["loss"] - results["dequantized"][0]["loss"])
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"\nresident bytes resident / dequantized: {resident_ratio:.3f}")
    print(
        f"peak (load + step) resident / dequantized: {peak_ratio:.3f}  target <= {PEAK_TARGET}  "
        f"{verdict(peak_ratio <= PEAK_TARGET)}"
    )
    print(
        f"step time resident / dequantized: {time_ratio:.3f}  target <= {TIME_TARGET}  "
        f"{verdict(time_ratio <= TIME_TARGET)}"
    )
    step_peak_ratio = med("resident", "step_peak") / med("dequantized", "step_peak")
    print(f"first-step peak resident / dequantized: {step_peak_ratio:.3f}")
    print(f"|loss resident - loss dequantized| = {loss_diff:.2e}")
    if args.kind == "moe" and not args.lora_experts:
        moe_ratio = time_ratio
        print(
            f"MoE step time resident (grouped_mm) / dequantized (grouped_mm): {moe_ratio:.3f}  target <= "
            f"{MOE_TIME_TARGET}  {verdict(moe_ratio <= MOE_TIME_TARGET)}"
        )
        for mine, peer in (
            ("resident", "dequantized-eager"),
            ("resident-eager", "dequantized-eager"),
            ("resident-eager", "resident"),
        ):
            print(
                f"{mine} / {peer}: step time {med(mine, 'step_seconds') / med(peer, 'step_seconds'):.3f}, "
                f"peak {med(mine, 'peak') / med(peer, 'peak'):.3f}"
            )
        same = abs(results["resident-eager"][0]["loss"] - results["dequantized-eager"][0]["loss"])
        print(f"|loss resident-eager - loss dequantized-eager| = {same:.2e}")
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "layer",
            "--path",
            str(checkpoint),
            "--dtype",
            args.dtype,
        ]
        cmd += ["--tokens", str(args.tokens), "--layer-repeats", str(args.layer_repeats)]
        layer = run_json_worker(cmd, what="layer", env=worker_env())
        print(
            f"\none MoE layer's experts alone, forward + backward, {args.tokens} tokens, interleaved in one process, "
            f"median of {args.layer_repeats}:"
        )
        for path, value in layer.items():
            print(f"  {path:<24} {value * 1e3:8.1f} ms")
        ratio = layer["resident grouped_mm"] / layer["dequantized grouped_mm"]
        print(f"  resident grouped_mm / dequantized grouped_mm: {ratio:.3f}")
    print(
        f"load average (1, 5, 15 min) at the end: {os.getloadavg()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
