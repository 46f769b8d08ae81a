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
from mistral_native_checkpoints import LARGE_3_IGNORE, mla_native_tensors, params_of
from safetensors.torch import save_file

from automodel_plugins.testing.tiny_models import tiny_mistral3_config

BLOCK = (8, 8)
"""Expert intermediate 24 and hidden 64 are multiples of 8: every expert piece starts on a block boundary, so
``dequantize=False`` keeps the experts FP8 (``Fp8Experts``)."""
IGNORE = LARGE_3_IGNORE
_BF16 = ("wkv_a_with_mqa.weight", "wq_a.weight", ".gate.weight")


def _params(model: Any) -> dict[str, Any]:
    text = model.config.text_config
    rope = text.rope_parameters
    return {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "head_dim": text.qk_nope_head_dim + text.qk_rope_head_dim,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": text.max_position_embeddings,
        "q_lora_rank": text.q_lora_rank,
        "kv_lora_rank": text.kv_lora_rank,
        "qk_nope_head_dim": text.qk_nope_head_dim,
        "qk_rope_head_dim": text.qk_rope_head_dim,
        "v_head_dim": text.v_head_dim,
        "moe": {
            "expert_hidden_dim": text.moe_intermediate_size,
            "first_k_dense_replace": text.first_k_dense_replace,
            "num_expert_groups": 1,
            "num_expert_groups_per_tok": 1,
            "num_experts": text.n_routed_experts,
            "num_experts_per_tok": text.num_experts_per_tok,
            "num_shared_experts": text.n_shared_experts,
            "route_every_n": 1,
            "routed_scale": 1.0,
        },
        "rope_theta": rope["rope_theta"],
        "yarn": {
            "alpha": rope["beta_slow"],
            "apply_scale": False,
            "beta": rope["beta_fast"],
            "factor": rope["factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
        },
        "llama_4_scaling": {
            "beta": rope["llama_4_scaling_beta"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
        },
        "vision_encoder": params_of(tiny_mistral3_config(vision={"hidden_act": "silu"}))["vision_encoder"],
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
