"""The memory plan (``automodel_plugins.plan_memory``, ``inspect --layout``) for published full-size configs, from
header-only checkpoints (sparse files: headers, no data), as the table in ``docs/fp8-resident.md``.

* Devstral 2 123B (text-only Ministral 3, per-tensor FP8 with static activation scales): the sizes of
  ``plugins/mistral3_fp8/tests/test_ministral3_text.py`` (``DEVSTRAL_2_123B_SIZES``, from public descriptions).
* Qwen3-VL-235B-A22B (block-FP8 128x128, one tensor per expert and projection, routers / vision / head BF16):
  94 layers, hidden 4096, 64 heads and 4 KV heads of 128, 128 experts of 1536 (8 active), vocabulary 151936,
  vision tower 27 layers of 1152 (the published config's sizes; the Qwen3-235B-A22B model card gives 94 layers,
  64 Q / 4 KV heads, 128 experts, 8 active).
* Mistral Large 3 675B: its real ``params.json`` (``--large3-params``, default the copy in
  ``/work/shared/reference/data``; the model is left out when it is absent) translated by the host
  (``sources.native.translate_params``) into the HF config, written as a header-only checkpoint in the HF form
  with the release's quantization: FP8 128x128 blocks, one tensor per expert and projection, the release's
  ``ignore`` list BF16 (embeddings, vision tower, adapter, ``kv_a_proj_with_mqa``, ``q_a_proj``, the routers,
  the head). The native names would not change a byte of the plan.

Layouts: FSDP2 (``fsdp=``), tensor parallelism (``tp=``) and expert parallelism (``ep=``: the experts split by
expert, as ``parallelize_experts`` places them, FSDP2 over the remaining ranks).

LoRA: r=16 on the default targets (q_proj and v_proj, the vision tower included where its names match; MLA's
q_b_proj and kv_b_proj for Large 3), and in the rows marked "+ experts" on both fused expert tensors too
(``target_parameters``: ``r * E * (in + out)`` a tensor and layer, split by expert under ``ep`` as
``parallelize_experts`` splits them, each rank its experts' rows);
fp32 adapters, gradients and two Adam states. Not counted: activations, temporaries, CUDA context.

    python benchmarks/plan_table.py            # markdown table on stdout
    python benchmarks/plan_table.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_checkpoint

GPU_BYTES = 80e9
DEVSTRAL_2_123B = {
    "hidden_size": 12288,
    "intermediate_size": 28672,
    "num_hidden_layers": 88,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""LoRA ``target_parameters`` of the expert rows (both fused expert tensors of every MoE layer)."""
LAYOUTS: dict[str, list[tuple[Any, ...]]] = {  # (layout, dequantize, LoRA r[, target_parameters])
    "Devstral 2 123B": [
        ("fsdp=8", True, 0),
        ("fsdp=8", False, 0),
        ("fsdp=8", False, 16),
        ("fsdp=4,tp=2", False, 16),
        ("tp=8", False, 16),
        ("fsdp=16", False, 16),
    ],
    "Qwen3-VL-235B-A22B": [
        ("fsdp=8", True, 0),
        ("fsdp=8", False, 0),
        ("fsdp=8", False, 16),
        ("fsdp=4,tp=2", False, 16),
        ("ep=8", False, 16),
        ("fsdp=2,ep=4", False, 16),
        ("fsdp=16", False, 16),
        ("fsdp=2,ep=8", True, 0),
        ("fsdp=8", False, 16, EXPERTS),
        ("fsdp=2,ep=8", False, 16, EXPERTS),
    ],
    "Mistral Large 3 675B": [
        ("fsdp=8", True, 0),
        ("fsdp=8", False, 0),
        ("fsdp=8", False, 16),
        ("ep=8", False, 16),
        ("fsdp=16", False, 16),
        ("fsdp=2,ep=8", False, 16),
        ("fsdp=16", True, 0),
        ("fsdp=4,ep=8", True, 0),
        ("fsdp=16", False, 16, EXPERTS),
        ("fsdp=2,ep=8", False, 16, EXPERTS),
    ],
}
LARGE_3_PARAMS = Path("/work/shared/reference/data/mistral-large-3-675b-instruct-2512.params.json")


def write_devstral(directory: Path) -> None:
    from automodel_plugins.testing.header_only import write_header_only_checkpoint
    from automodel_plugins.testing.tiny_models import MINISTRAL3_TEXT_ROPE_PARAMETERS, tiny_ministral3_config

    config = tiny_ministral3_config(**DEVSTRAL_2_123B, rope_parameters=MINISTRAL3_TEXT_ROPE_PARAMETERS)
    write_header_only_checkpoint(
        config,
        directory,
        block_size=None,
        modules_to_not_convert=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    )


def write_qwen3_vl_235b(directory: Path) -> None:
    from _checkpoint import build_qwen3_vl_235b_config  # the published config, shared with bench_inspect

    from automodel_plugins.testing.header_only import write_header_only_checkpoint

    config = build_qwen3_vl_235b_config()
    layers = config.text_config.num_hidden_layers
    write_header_only_checkpoint(
        config,
        directory,
        block_size=(128, 128),
        modules_to_not_convert=(
            "model.visual",
            "lm_head",
            *(f"model.language_model.layers.{i}.mlp.gate" for i in range(layers)),
        ),
        activation_scale=False,
        quantization_extra={"fmt": "e4m3"},
    )


def write_large3(directory: Path, params: Path = LARGE_3_PARAMS) -> None:
    from transformers import AutoConfig

    from automodel_plugins.sources.native import translate_params
    from automodel_plugins.testing.header_only import write_header_only_checkpoint

    data = translate_params(json.loads(params.read_text()))
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    layers = config.text_config.num_hidden_layers
    ignored = ("mlp.gate", "self_attn.kv_a_proj_with_mqa", "self_attn.q_a_proj")
    write_header_only_checkpoint(
        config,
        directory,
        block_size=(128, 128),
        modules_to_not_convert=(
            "model.vision_tower",
            "model.multi_modal_projector",
            "lm_head",
            *(f"model.language_model.layers.{i}.{module}" for i in range(layers) for module in ignored),
        ),
        activation_scale=False,
        quantization_extra={"fmt": "e4m3"},
    )


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f}"


def rows(name: str, path: Path) -> list[dict[str, Any]]:
    import automodel_plugins
    from automodel_plugins.pipeline.load.memory_plan import Layout

    out = []
    for layout, dequantize, lora_r, *target_parameters in LAYOUTS[name]:
        degrees = Layout.parse(layout)
        started = time.perf_counter()
        plan = automodel_plugins.plan_memory(
            path,
            fsdp=degrees.fsdp,
            tp=degrees.tp,
            ep=degrees.ep,
            dequantize=dequantize,
            lora_r=lora_r,
            lora_target_parameters=target_parameters[0] if target_parameters else (),
        )
        worst = plan.worst
        out.append(
            {
                "model": name,
                "layout": layout,
                "load": "dequantized (BF16)" if dequantize else "FP8-resident",
                "lora_r": lora_r,
                "lora_experts": bool(target_parameters),
                "read_worst": max(r.read for r in plan.ranks),
                "held": dict(worst.held),
                "weights_worst": worst.weights,
                "lora_worst": sum(worst.lora.values()),
                "total_worst": worst.total,
                "total_all": sum(r.total for r in plan.ranks),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"{name} {layout} {out[-1]['load']} r={lora_r}: {gb(worst.total)} GB", file=sys.stderr)
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    head = (
        "| model | layout | load | LoRA r | read / rank (worst) | weights held / rank (worst): FP8 codes + scales"
        " + BF16 | LoRA + grads + Adam / rank | total / rank (worst) | all ranks | fits 80 GB? |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for row in table:
        held = row["held"]
        parts = " + ".join(f"{gb(held[k])}" for k in ("fp8_codes", "scales", "bfloat16") if k in held)
        lora = f"{row['lora_r']}{' + experts' if row.get('lora_experts') else ''}" if row["lora_r"] else "-"
        lines.append(
            f"| {row['model']} | {row['layout']} | {row['load']} | {lora} | {gb(row['read_worst'])} GB"
            f" | {gb(row['weights_worst'])} GB ({parts}) | {gb(row['lora_worst'])} GB | {gb(row['total_worst'])} GB"
            f" | {gb(row['total_all'])} GB | {'yes' if row['total_worst'] < GPU_BYTES else 'no'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=sorted(LAYOUTS), help="one model")
    parser.add_argument("--large3-params", type=Path, default=LARGE_3_PARAMS, help="Large 3's params.json")
    args = parser.parse_args()
    table = []
    writers = [("Devstral 2 123B", write_devstral), ("Qwen3-VL-235B-A22B", write_qwen3_vl_235b)]
    if args.large3_params.is_file():
        writers.append(("Mistral Large 3 675B", lambda path: write_large3(path, args.large3_params)))
    else:
        print(f"{args.large3_params} not found: Mistral Large 3 left out", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in writers:
            if args.only and args.only != name:
                continue
            path = Path(tmp) / name.replace(" ", "-")
            write(path)
            table += rows(name, path)
    print(json.dumps(table, indent=2) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
