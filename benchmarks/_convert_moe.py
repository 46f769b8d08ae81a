"""``bench_convert.py --kind native-moe``: ``convert`` of the MoE checkpoint forms, memory and bytes read.

Checkpoints (generated once under ``<repo>/.cache/bench/``, random weights; sizes are what matter):

* ``large3``: a Mistral-Large-3-shaped model (Mistral 4 text: MLA, hidden 1024, 9 layers of which 8 are MoE
  with 32 experts of intermediate 512 and a shared expert; a small Pixtral tower) in Mistral's native form as
  Large 3 ships it: ``params.json`` with compressed-tensors FP8_BLOCK (128x128, BF16 ``weight_scale`` grids,
  Large 3's ignore list), per-expert ``layers.N.experts.E.w1/w2/w3``; written by ``convert --layout native``
  from ``mistral4-per-expert``;
* ``mistral4-fused`` / ``mistral4-per-expert``: the same model in transformers' form, experts fused
  (``gate_up_proj [E, 2I, H]`` with one 128x128 grid per expert) or one FP8 tensor per expert and projection;
* ``qwen3-vl-moe``: the MoE load benchmark's Qwen3-VL-MoE (``_checkpoint.ensure_moe_checkpoint``: per-expert
  128x128-block FP8, the FP8 releases' form).

Each case is a fresh process (``--worker``); after every import (the model classes included, as
``bench_convert.py`` does: their first import is ~100 MiB that no conversion size changes), ``gc.collect()``,
baseline ``VmRSS``, peak by ``_memory.PeakRss``. Bytes read are the reader's own counter
(``Checkpoint.bytes_read``: every ``pread``), over the checkpoint's tensor bytes.

Peer: transformers' ``from_pretrained`` + ``save_pretrained`` where it reads the form right. It reads the
Qwen3-VL-MoE form with the per-expert conversion registered (``testing.stock_conversions``; the driver checks
both wrote the same tensors bit for bit). It has none for the others: it cannot read the native form
(``params.json``), and transformers 5.x loads Mistral 4's FP8 experts wrong in both HF forms (per-expert: left
at their random init; fused block-FP8: every expert tensor differs from the dequantized checkpoint).

Targets: peak over baseline / output bytes <= 0.15; bytes read / checkpoint bytes 1.0 for one pass (BF16 out),
2.0 for FP8 out with fresh scales (the amax pass, then the codes); wall time ours / transformers <= 1.0.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _checkpoint import CACHE_DIR, ensure_directory, ensure_moe_checkpoint
from _memory import PeakRss
from _workers import run_json_worker, worker_env

MEMORY_TARGET = 0.15
TIME_TARGET = 1.0
BLOCK = (128, 128)
SEED = 0
TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 9,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
}
CASES = {
    "large3 -> native fp8-block": ("large3", "fp8-block", "native"),
    "large3 -> hf bf16": ("large3", "bf16", "hf"),
    "mistral4-fused -> native bf16": ("mistral4-fused", "bf16", "native"),
    "mistral4-per-expert -> native fp8-block": ("mistral4-per-expert", "fp8-block", "native"),
    "qwen3-vl-moe -> hf bf16": ("qwen3-vl-moe", "bf16", "hf"),
}
PEERS = {"qwen3-vl-moe -> hf bf16": "transformers"}


def _config():
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    from automodel_plugins.testing.tiny_models import TINY_PIXTRAL_SIZES

    return Mistral3Config(
        text_config=Mistral4Config(**copy.deepcopy(TEXT)),  # transformers writes into rope_parameters
        vision_config=PixtralVisionConfig(**{**TINY_PIXTRAL_SIZES, "hidden_act": "silu"}),
        image_token_id=10,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )


def _write_hf(directory: Path, experts: str) -> None:
    """The Mistral 4 model in transformers' form, experts ``per-expert`` or ``fused-runtime``, 128x128 FP8."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    config = _config()
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0, 0.02, generator=generator)
    layers = config.text_config.num_hidden_layers
    write_fp8_checkpoint(
        model.to(torch.bfloat16),
        directory,
        block_size=BLOCK,
        activation_scale_name=None,
        modules_to_not_convert=(
            "model.vision_tower",
            "model.multi_modal_projector",
            "lm_head",
            *(f"model.language_model.layers.{i}.mlp.gate" for i in range(layers)),
        ),
        shards=3,
        experts=experts,
        quantization_extra={"activation_scheme": "dynamic"},
    )


def _write(form: str, directory: Path) -> None:
    if form == "large3":
        from automodel_plugins import convert_checkpoint

        source = ensure_form("mistral4-per-expert")
        convert_checkpoint(source, directory, to="fp8-block", layout="native", progress=False, fsync=False)
    else:
        _write_hf(directory, "per-expert" if form == "mistral4-per-expert" else "fused-runtime")


def ensure_form(form: str) -> Path:
    """The cached checkpoint of ``form`` (see the module docstring), generated on first use."""
    if form == "qwen3-vl-moe":
        return ensure_moe_checkpoint()
    import hashlib

    digest = hashlib.sha256(json.dumps([TEXT, BLOCK, SEED, form, 1], sort_keys=True).encode()).hexdigest()[
        :10
    ]
    final = CACHE_DIR / f"mistral4-moe-{form}-{digest}"
    return ensure_directory(final, lambda tmp: _write(form, tmp), label=form)


def worker(case: str, converter: str, dest: str) -> dict[str, Any]:
    """One conversion of ``case`` by ``converter`` (``ours`` or ``transformers``), measured."""
    import torch
    from bench_convert import digests
    from transformers import (
        Mistral3ForConditionalGeneration,
        Mistral4ForCausalLM,
        PixtralVisionModel,
        Qwen3VLMoeForConditionalGeneration,
    )
    from transformers.utils import logging

    import automodel_plugins
    import automodel_plugins.pipeline.save.convert
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.testing.stock_conversions import stock_per_expert_conversion

    del Mistral4ForCausalLM, PixtralVisionModel  # imported before the baseline, for both converters
    logging.set_verbosity_error()
    form, to, layout = CASES[case]
    path = ensure_form(form)
    with Checkpoint.open(path) as checkpoint:
        checkpoint_bytes = checkpoint.total_nbytes()
    read = [0]
    close = Checkpoint.close

    def counting_close(self: Checkpoint) -> None:  # the reader's own counter, summed over every open
        read[0] += self.bytes_read
        self.bytes_read = 0
        close(self)

    Checkpoint.close = counting_close
    with PeakRss() as peak:
        wall, cpu = time.perf_counter(), time.process_time()
        if converter == "ours":
            automodel_plugins.convert_checkpoint(path, dest, to=to, layout=layout, progress=False)
        else:
            stock = (
                Qwen3VLMoeForConditionalGeneration
                if form == "qwen3-vl-moe"
                else Mistral3ForConditionalGeneration
            )
            with stock_per_expert_conversion():
                model = stock.from_pretrained(path, dtype=torch.bfloat16)
            model.save_pretrained(dest)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_bytes": peak.extra_bytes,
        "output_bytes": sum(f.stat().st_size for f in Path(dest).glob("*.safetensors")),
        "checkpoint_bytes": checkpoint_bytes,
        "bytes_read": read[0] if converter == "ours" else None,
        "method": peak.method,
        "digests": digests(Path(dest)) if case in PEERS else {},
    }


def run(script: str, repeats: int, scratch: Path) -> int:
    """Every case, ours and its peer alternating, ``repeats`` processes each; the table and the checks."""
    for form in sorted({form for form, _, _ in CASES.values()}):
        for file in sorted(ensure_form(form).glob("*.safetensors")):  # a warm page cache for all
            file.read_bytes()
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for repeat in range(repeats):
        for case in CASES:
            converters = ["ours", *([PEERS[case]] if case in PEERS else [])]
            for converter in converters if repeat % 2 == 0 else converters[::-1]:
                dest = scratch / "out"
                command = [
                    sys.executable,
                    script,
                    "--worker-moe",
                    case,
                    "--worker",
                    converter,
                    "--dest",
                    str(dest),
                ]
                os.sync()
                try:
                    row = run_json_worker(
                        command, what=f"{case} {converter}", env=worker_env(TQDM_DISABLE="1")
                    )
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                rows.setdefault((case, converter), []).append(row)
                print(
                    f"  run {repeat + 1} {case:<42} {converter:<12} wall {row['wall_s']:6.2f} s  "
                    f"peak +{row['peak_bytes'] / 2**20:5.0f} MiB",
                    flush=True,
                )

    def med(case: str, converter: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[(case, converter)])

    mib = 2**20
    print(f"\nmedian of {repeats} process(es) each; memory: {rows[next(iter(rows))][0]['method']}")
    print(
        "| conversion | converter | checkpoint (MiB) | output (MiB) | wall (s) | peak over baseline (MiB) | "
        "peak / output | bytes read / checkpoint |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    checks = []
    for (case, converter), runs in rows.items():
        output = med(case, converter, "output_bytes")
        ratio = med(case, converter, "peak_bytes") / output
        read = runs[0]["bytes_read"]
        read_ratio = None if read is None else read / runs[0]["checkpoint_bytes"]
        print(
            f"| {case} | {converter} | {runs[0]['checkpoint_bytes'] / mib:.0f} | {output / mib:.0f} | "
            f"{med(case, converter, 'wall_s'):.2f} | {med(case, converter, 'peak_bytes') / mib:.0f} | "
            f"{ratio:.3f} | {'n/a' if read_ratio is None else f'{read_ratio:.3f}'} |"
        )
        if converter != "ours":
            continue
        passes = 1 if CASES[case][1] == "bf16" else 2
        checks.append(
            (f"{case}: peak / output {ratio:.3f} (target <= {MEMORY_TARGET})", ratio <= MEMORY_TARGET)
        )
        checks.append(
            (
                f"{case}: bytes read / checkpoint {read_ratio:.3f} (target {passes}.0)",
                read_ratio <= passes + 1e-3,
            )
        )
        peer = PEERS.get(case)
        if peer is None:
            print(f"  {case}: no peer (see the module docstring)")
            continue
        wall = med(case, "ours", "wall_s") / med(case, peer, "wall_s")
        checks.append(
            (f"{case}: wall ours / {peer} {wall:.3f} (target <= {TIME_TARGET})", wall <= TIME_TARGET)
        )
        same = rows[(case, "ours")][0]["digests"] == rows[(case, peer)][0]["digests"]
        checks.append((f"{case}: ours and {peer} wrote the same tensors, bit for bit", same))
    print()
    for text, ok in checks:
        print(f"{text}  {'PASS' if ok else 'FAIL'}")
    print(f"overall: {'PASS' if all(ok for _, ok in checks) else 'FAIL'}")
    return 0
