"""A tiny Mistral-Large-3-shaped checkpoint in Mistral's native form, FP8 as the release stores it: ``params.json``
with its compressed-tensors ``FP8_BLOCK`` section (static FP8 weights in blocks, ``weight_scale`` grids, the
release's ``ignore`` list: embeddings, vision, adapter, ``kv_a_proj_with_mqa``, ``q_a_proj``, the router
``gate``, the head) and ``consolidated.safetensors`` with native names, the routed experts one tensor per expert
and projection (``layers.N.experts.E.w1/w2/w3``). Written from the tiny Mistral 4 model of
``tests/mistral4_checkpoints.py`` by ``mistral_native_checkpoints``' name table (transformers' Mistral 4 conversion run
backwards), never the plugin's mapping."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from mistral4_checkpoints import _FP8_MAX, _blocks, _expand, tiny_model
from mistral_native_checkpoints import LARGE_3_IGNORE, mla_native_tensors, mla_params_of
from safetensors.torch import save_file

BLOCK = (8, 8)
"""Expert intermediate 24 and hidden 64 are multiples of 8: every expert piece starts on a block boundary, so
``dequantize=False`` keeps the experts FP8 (``Fp8Experts``)."""
IGNORE = LARGE_3_IGNORE
_BF16 = ("wkv_a_with_mqa.weight", "wq_a.weight", ".gate.weight")


def _params(model: Any) -> dict[str, Any]:
    """The release's ``params.json``: the Large-3 fields of ``mla_params_of`` and the FP8_BLOCK section."""
    return {
        **mla_params_of(model.config),
        "quantization_config": {
            "config_groups": {
                "FP8_BLOCK": {
                    "format": "float-quantized",
                    "input_activations": {
                        "dynamic": True,
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "group",
                    },
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": {
                        "block_structure": list(BLOCK),
                        "dynamic": False,
                        "num_bits": 8,
                        "strategy": "block",
                        "symmetric": True,
                        "type": "float",
                    },
                }
            },
            "format": "float-quantized",
            "ignore": IGNORE,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        },
    }


def write_mla_moe_native(directory: Path, seed: int = 0) -> Path:
    """The checkpoint (see the module doc); the text linears (experts, shared experts, the dense MLP, ``wq_b``,
    ``wkv_b``, ``wo``) FP8 in ``BLOCK`` blocks with a BF16 ``weight_scale`` grid, the rest as the model holds it."""
    model = tiny_model(seed)
    tensors = mla_native_tensors(model.state_dict(), model.config)
    linear = re.compile(r"^layers\.\d+\.")
    for key in [k for k in tensors if linear.match(k) and k.endswith(".weight") and tensors[k].dim() == 2]:
        if key.endswith(_BF16):
            continue
        # a BF16 grid, as the release stores it: the codes are made against the value it is read as
        grid = _blocks(tensors[key].float(), BLOCK)[1].to(torch.bfloat16)
        tensors[key] = _codes(tensors[key].float(), grid.float())
        tensors[key.removesuffix("weight") + "weight_scale"] = grid
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(_params(model)))
    save_file(tensors, directory / "consolidated.safetensors")
    return directory


def _codes(weight: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    expanded = _expand(grid, weight.shape, BLOCK)
    return (weight / expanded).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
