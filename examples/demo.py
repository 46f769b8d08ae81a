"""`make demo`: an FP8 Mistral3 checkpoint in the real on-disk format, loaded into stock transformers, then tuned.

1. Writes (once, into ``.cache/demo/``) a small random Mistral3 VLM as Ministral 3 ships: legacy key layout,
   every text-stack Linear ``float8_e4m3fn`` with a 0-d ``weight_scale_inv`` and an ``activation_scale``,
   vision tower / projector / embeddings / norms / untied ``lm_head`` in BF16, 2 shards plus an index.
2. Runs ``automodel-plugins list --config DIR`` and ``automodel-plugins inspect DIR``.
3. Loads it with ``automodel_plugins.from_pretrained`` and runs one forward on an image plus text.
4. Fine-tunes it for a few AdamW steps on one image+text batch, once with the plugin's fused-loss forward and
   once with the stock ``Mistral3ForConditionalGeneration.forward`` (same loader, same data, same seed).
5. Saves the fine-tuned model back in its own FP8 format (``automodel_plugins.save_pretrained``, into
   ``.cache/demo/finetuned-fp8``) and loads that with stock transformers.

Steps 3 and 4 each run in a fresh process (``--child``), so that every memory figure is that process's own:
peak RSS over the RSS right before the measured call (``VmHWM`` reset through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from automodel_plugins.testing.tiny_models import MINISTRAL3_ROPE_PARAMETERS

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "demo"
CHECKPOINT = CACHE / "mistral3-fp8-v2"
FINETUNED = CACHE / "finetuned-fp8"
IMAGE_TOKEN_ID = 10
IMAGE_SIZE = 224  # one 224x224 image: (224 // (14 * 2)) ** 2 = 64 image tokens
SEQ_LEN = 256
STEPS = 5
LR = 1e-3


# --- the checkpoint ----------------------------------------------------------------------------------------


def make_config():
    from transformers import Mistral3Config, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    text = Ministral3Config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
        max_position_embeddings=262144,
        rope_parameters=dict(MINISTRAL3_ROPE_PARAMETERS),
    )
    vision = PixtralVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, head_dim=64,
        image_size=448, patch_size=14,
    )  # fmt: skip
    return Mistral3Config(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, spatial_merge_size=2,
        tie_word_embeddings=False,
    )  # fmt: skip


def ensure_checkpoint() -> tuple[Path, float | None]:
    """The demo checkpoint, and the seconds it took to write (None: it was already there)."""
    if (CHECKPOINT / "config.json").is_file():
        return CHECKPOINT, None
    import torch
    from automodel_plugins_mistral3_fp8.layout import LEGACY_RENAMES
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.adapters import PrefixRenames
    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    started = time.perf_counter()
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(make_config())
    model.config.architectures = ["Mistral3ForConditionalGeneration"]  # as save_pretrained writes it
    tmp = CHECKPOINT.with_name(CHECKPOINT.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_fp8_checkpoint(
        model,
        tmp,
        rename=PrefixRenames(LEGACY_RENAMES).to_checkpoint,
        modules_to_not_convert=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        shards=2,
    )
    tmp.rename(CHECKPOINT)
    return CHECKPOINT, time.perf_counter() - started


# --- memory ------------------------------------------------------------------------------------------------


def _kib(field: str) -> int:
    return int(
        re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)
    )


class Peak:
    """Peak RSS (bytes) over the RSS at entry, from the kernel's reset high-water mark."""

    def __enter__(self) -> Peak:
        gc.collect()
        self.base = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        if _kib("VmHWM") > _kib("VmRSS") + 1024:
            raise RuntimeError("this kernel did not reset VmHWM; the demo's memory figures would be wrong")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = (_kib("VmHWM") - self.base) * 1024


# --- inputs ------------------------------------------------------------------------------------------------


def image_batch(config, text_tokens: int, seed: int = 0):
    """One image plus text, as the Mistral3 processor lays it out: BOS, one token id 10 per merged patch, text."""
    import torch

    vision = config.vision_config
    per_side = IMAGE_SIZE // (vision.patch_size * config.spatial_merge_size)
    n_image = per_side * per_side
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(20, config.text_config.vocab_size, (text_tokens,), generator=generator)
    ids = torch.cat([torch.tensor([1]), torch.full((n_image,), IMAGE_TOKEN_ID), text]).unsqueeze(0)
    pixels = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(torch.bfloat16)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]]),
    }, n_image


# --- children ----------------------------------------------------------------------------------------------


def child_load(path: str) -> dict:
    import torch
    from transformers import Mistral3ForConditionalGeneration  # noqa: F401  (imported before the baseline)

    import automodel_plugins
    import automodel_plugins.pipeline.load.load

    with Peak() as peak:
        started = time.perf_counter()
        model = automodel_plugins.from_pretrained(path, progress=False)
        seconds = time.perf_counter() - started
    composition = model.automodel_composition
    report = composition.load
    params = sum(p.numel() for p in model.parameters())
    batch, n_image = image_batch(model.config, text_tokens=12)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1].float()
    top = logits.softmax(-1).topk(5)
    return {
        "plugin": composition.plugin,
        "version": composition.plugin_version,
        "reason": composition.claim_reason,
        "class": type(model).__name__,
        "forward_overridden": composition.forward_overridden,
        "dequantized_from": composition.dequantized_from,
        "tensors": report.tensors,
        "dequantized": report.dequantized,
        "in_place": report.used_in_place,
        "dropped": len(report.dropped_keys),
        "seconds": seconds,
        "peak": peak.bytes,
        "params": params,
        "bf16_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "seq": batch["input_ids"].shape[1],
        "n_image": n_image,
        "top5": [(int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True)],
    }


def fast_cpu_bf16() -> bool:
    """BF16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere torch runs them ~40x slower than fp32."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def child_train(path: str, loss: str) -> dict:
    import torch

    import automodel_plugins

    torch.manual_seed(0)
    dtype = torch.bfloat16 if fast_cpu_bf16() else torch.float32
    threads = torch.get_num_threads()
    with Peak() as load_peak:
        model = automodel_plugins.from_pretrained(
            path, dtype=dtype, skip_logits=(loss == "fused"), progress=False
        )
    if loss == "stock":
        # the class's own forward: logits [B, S, V], then transformers' loss on them
        model.forward = type(model).forward.__get__(model)
    model.train()
    batch, n_image = image_batch(model.config, text_tokens=SEQ_LEN - 1 - 64, seed=1)
    labels = batch["input_ids"].clone()
    labels[:, : 1 + n_image] = -100  # no loss on BOS and image tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    steps = []
    loaded_kib = _kib("VmRSS")
    overall = 0
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with Peak() as peak:
            started = time.perf_counter()
            out = model(**batch, labels=labels)
            out.loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - started
        overall = max(overall, (peak.base - loaded_kib) * 1024 + peak.bytes)
        logits = out.logits is not None
        steps.append(
            {"loss": float(out.loss.detach()), "peak": peak.bytes, "seconds": seconds, "logits": logits}
        )
        del out
    saved = child_save(model) if loss == "fused" else None
    return {
        "saved": saved,
        "loss_kind": loss,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "overall_peak": overall,
        "load_peak": load_peak.bytes,
        "tokens": int(batch["input_ids"].numel()),
        "vocab": model.config.text_config.vocab_size,
        "threads": threads,
        "n_image": n_image,
    }


def child_save(model) -> dict:
    """The fine-tuned model saved as its source (FP8, as loaded), then read back by stock transformers."""
    from transformers import Mistral3ForConditionalGeneration

    import automodel_plugins

    report = automodel_plugins.save_pretrained(model, FINETUNED, overwrite=True, progress=False)
    stock = Mistral3ForConditionalGeneration.from_pretrained(FINETUNED)
    return {
        "path": str(report.path),
        "files": len(report.files),
        "bytes": report.bytes,
        "quantized": report.quantized,
        "kept": report.scales_kept,
        "fresh": report.scales_fresh,
        "carried": report.carried,
        "seconds": report.seconds,
        "stock_params": sum(p.numel() for p in stock.parameters()),
    }


def busy_machine() -> bool:
    """Other jobs already keep every core busy: torch's parallel regions would then wait on descheduled threads
    (measured here: 2 threads made a training step ~10x slower than 1), so the children run single-threaded."""
    return os.getloadavg()[0] >= (os.cpu_count() or 1)


def run_child(*args: str) -> dict:
    # Tensors of 1 MiB and more get their own mapping, returned to the OS when freed: each step's peak then
    # starts from what is really live, not from glibc's cache of earlier steps' freed blocks.
    env = {**os.environ, "AUTOMODEL_PLUGINS_PROGRESS": "0", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    if busy_machine() and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"demo step {args} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the demo ----------------------------------------------------------------------------------------------


def cli(*args: str, max_lines: int = 1000) -> None:
    script = Path(sys.executable).with_name("automodel-plugins")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "automodel_plugins.cli"]
    shown = " ".join(
        ["automodel-plugins", *(os.path.relpath(a, REPO_ROOT) if os.sep in a else a for a in args)]
    )
    print(f"\n$ {shown}")
    proc = subprocess.run([*command, *args], capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).rstrip().splitlines()
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more lines)"]
    print("  " + "\n  ".join(lines))
    if proc.returncode != 0:
        print(f"  (exit status {proc.returncode})")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _, path, loss, *extra = args.child
        result = {"load": child_load(path)} if "with-load" in extra else {}
        gc.collect()
        result.update(child_train(path, loss))
        print(json.dumps(result))
        return 0

    started = time.perf_counter()
    print("automodel-plugins demo: an FP8 Mistral3 VLM checkpoint into stock transformers, then fine-tuned")
    path, wrote = ensure_checkpoint()
    shards = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    note = f"written in {wrote:.1f} s" if wrote is not None else "cached"
    print(f"checkpoint: {os.path.relpath(path, REPO_ROOT)}  ({len(shards)} shards, {mib(size)}, {note})")

    cli("list", "--config", str(path))
    cli("inspect", str(path), max_lines=30)

    # The first child loads and runs the forward (its own memory figures), then trains with the fused loss.
    runs = {"fused": run_child("train", str(path), "fused", "with-load")}
    runs["stock"] = run_child("train", str(path), "stock")
    load = runs["fused"]["load"]
    print(f"\nload     plugin {load['plugin']} {load['version']}: {load['reason']}")
    print(
        f"         -> {load['class']} ({load['params'] / 1e6:.1f}M parameters, {load['dtype']}), "
        f"forward overridden: {load['forward_overridden']}, quantization_config dropped: {load['dequantized_from']}"
    )
    print(
        f"         {load['tensors']} tensors: {load['dequantized']} FP8 dequantized, {load['in_place']} BF16 "
        f"memory-mapped in place, {load['dropped']} activation scales dropped"
    )
    print(
        f"         {load['seconds']:.2f} s, peak RSS +{mib(load['peak'])} "
        f"({load['peak'] / load['bf16_bytes']:.2f}x the {mib(load['bf16_bytes'])} of BF16 parameters)"
    )
    top = ", ".join(f"{i} ({p:.3f})" for i, p in load["top5"])
    print(
        f"forward  1 image {IMAGE_SIZE}x{IMAGE_SIZE} ({load['n_image']} image tokens) + text, "
        f"{load['seq']} tokens -> top-5 next tokens: {top}"
    )

    fused, stock = runs["fused"]["steps"], runs["stock"]["steps"]
    dtype = runs["fused"]["dtype"]
    why = (
        "" if dtype == "bfloat16" else " (this CPU lacks AVX512-BF16/AMX: BF16 matmuls would run ~40x slower)"
    )
    threads = runs["fused"]["threads"]
    if threads == 1 and (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = "1: the load average was at the core count, see busy_machine()"
    print(
        f"\nfine-tune {STEPS} AdamW steps (lr {LR}, {dtype}{why}, torch threads {threads}), batch 1 x "
        f"{runs['fused']['tokens']} tokens ({runs['fused']['n_image']} image tokens, no loss on them); fused and "
        "stock each in a fresh process, same loader, data and seed; stock = the class's own forward (full logits, "
        "then the loss)"
    )
    print("  step | loss fused | loss stock | step peak fused | step peak stock | s fused | s stock")
    for i, (f, s) in enumerate(zip(fused, stock, strict=True), 1):
        print(
            f"  {i:>4} | {f['loss']:10.4f} | {s['loss']:10.4f} | {mib(f['peak']):>15} | {mib(s['peak']):>15} | "
            f"{f['seconds']:7.2f} | {s['seconds']:7.2f}"
        )
    later = slice(1, None)  # step 1 also allocates AdamW's state
    fused_peak = statistics.median(st["peak"] for st in fused[later])
    stock_peak = statistics.median(st["peak"] for st in stock[later])
    logits_bytes = runs["stock"]["tokens"] * runs["stock"]["vocab"] * 4
    print(
        f"  loss {fused[0]['loss']:.3f} -> {fused[-1]['loss']:.3f} (fused), "
        f"{stock[0]['loss']:.3f} -> {stock[-1]['loss']:.3f} (stock); fused returned logits: "
        f"{any(st['logits'] for st in fused)}"
    )
    print(
        f"  step peak RSS over the RSS before the step, median of steps 2-{STEPS} (step 1 also creates AdamW's "
        f"state): fused {mib(fused_peak)} vs stock {mib(stock_peak)} ({fused_peak / stock_peak:.2f}x)"
    )
    print(
        f"  (at this size the stock [tokens, vocab] fp32 logits are only {mib(logits_bytes)}, within the "
        "run-to-run noise; benchmarks/bench_train_step.py measures the 32768-vocab model)"
    )
    print(
        f"  peak RSS over the loaded model across all {STEPS} steps (grads + AdamW state + activations): "
        f"fused {mib(runs['fused']['overall_peak'])} vs stock {mib(runs['stock']['overall_peak'])}"
    )
    saved = runs["fused"]["saved"]
    print(
        f"\nsave     automodel_plugins.save_pretrained(model, {os.path.relpath(saved['path'], REPO_ROOT)}): the "
        f"source's format, {saved['files']} files, {mib(saved['bytes'])} (the checkpoint: {mib(size)}) in "
        f"{saved['seconds']:.1f} s"
    )
    print(
        f"         {saved['quantized']} FP8 weights: {saved['kept']} kept their source scale, {saved['fresh']} moved "
        f"past it and got a fresh one; {saved['carried']} activation scales carried over; stock transformers "
        f"loads it ({saved['stock_params'] / 1e6:.1f}M parameters)"
    )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
