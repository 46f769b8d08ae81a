"""Fine-grained FP8 checkpoints rewritten as llm-compressor stores the same values (compressed-tensors), for the
Qwen3-VL plugins' tests: ``weight_scale`` for ``weight_scale_inv`` (both multiplied), the compressed-tensors
``quantization_config`` of FP8_BLOCK or FP8_DYNAMIC (per-channel ``[out, 1]`` scales), and the ``ignore`` list
llm-compressor's Qwen3-VL-MoE example uses (vllm-project/llm-compressor,
``examples/quantization_w8a8_fp8/qwen3_vl_moe_fp8_example.py``: ``FP8_DYNAMIC``, experts unfused into
per-expert ``Linear`` modules by ``replace_modules_for_calibration``, so keys are
``mlp.experts.E.{gate,up,down}_proj.weight`` with their own ``weight_scale``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mistral4_checkpoints import stored_tensors
from safetensors.torch import save_file
from test_compressed_tensors_hf import CHANNEL, fp8_block

__all__ = ["CHANNEL", "QWEN3_VL_IGNORE", "as_llm_compressor"]

QWEN3_VL_IGNORE = ["re:.*lm_head", "re:visual.*", "re:model.visual.*", "re:.*mlp.gate$"]
"""The ``ignore`` of llm-compressor's Qwen3-VL(-MoE) FP8 example: head, vision tower, routers."""


def as_llm_compressor(source: Path, destination: Path, ignore: list[str] = QWEN3_VL_IGNORE) -> Path:
    """``source`` (one-file fine-grained FP8, ``weight_scale_inv``, dynamic activations) in compressed-tensors
    form: same codes and scales, renamed; the config's ``quantization_config`` llm-compressor's."""
    destination.mkdir(parents=True)
    renamed = {
        key.replace("weight_scale_inv", "weight_scale"): value
        for key, value in stored_tensors(source).items()
    }
    save_file(renamed, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    config["quantization_config"] = {**fp8_block(block), "ignore": list(ignore)}
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination
