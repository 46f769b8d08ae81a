"""Tiny Mistral3 checkpoints written in Mistral's native form (``params.json``, ``consolidated.safetensors``) by
the tests' own writer: transformers' ``convert_mistral3_weights_to_hf.py`` run backwards from its own table
(``STATE_DICT_MAPPING`` inverted, ``permute_for_rope`` undone), never the plugin's mapping, so a wrong name or
permutation in the plugin cannot hide behind the same one here. Shared by ``test_mistral_native.py`` and the
distributed scenarios.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

# transformers' STATE_DICT_MAPPING (native -> legacy HF), reversed here: HF runtime name -> native key.
_TO_NATIVE = [
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.language_model\.norm\.weight$", "norm.weight"),
    (r"^model\.language_model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (
        r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight$",
        r"layers.\1.ffn_norm.weight",
    ),
    (
        r"^model\.language_model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight$",
        r"layers.\1.attention.w\2.weight",
    ),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight$",
        r"vision_encoder.transformer.layers.\1.\2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.attention\.(q|k|v|o)_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.attention.w\2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w1.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w3.weight",
    ),
    (r"^model\.multi_modal_projector\.linear_1\.weight$", "vision_language_adapter.w_in.weight"),
    (r"^model\.multi_modal_projector\.linear_2\.weight$", "vision_language_adapter.w_out.weight"),
    (r"^model\.vision_tower\.ln_pre\.weight$", "vision_encoder.ln_pre.weight"),
    (r"^model\.vision_tower\.patch_conv\.weight$", "vision_encoder.patch_conv.weight"),
    (
        r"^model\.multi_modal_projector\.patch_merger\.merging_layer\.weight$",
        "patch_merger.merging_layer.weight",
    ),
    (r"^model\.multi_modal_projector\.norm\.weight$", "pre_mm_projector_norm.weight"),
]


def native_key(name: str) -> str:
    for pattern, replacement in _TO_NATIVE:
        key, hits = re.subn(pattern, replacement, name)
        if hits:
            return key
    raise AssertionError(f"no native name for {name}")


def unpermute_for_rope(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of transformers' ``permute_for_rope``: HF half-split rows back to Mistral's interleaved ones."""
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def native_tensors(model: Mistral3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().clone()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            if "vision_tower" in name:
                heads = config.vision_config.num_attention_heads
            elif "q_proj" in name:
                heads = config.text_config.num_attention_heads
            else:
                heads = config.text_config.num_key_value_heads
            value = unpermute_for_rope(value, heads)
        out[native_key(name)] = value.contiguous()
    return out


def params_of(config: Any) -> dict[str, Any]:
    """The ``params.json`` a Ministral 3 VLM release carries for ``config`` (field names as published)."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "rope_theta": rope["rope_theta"],
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": text.max_position_embeddings,
        "yarn": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "factor": rope["factor"],
            "apply_scale": False,
            "beta": rope["beta_fast"],
            "alpha": rope["beta_slow"],
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["llama_4_scaling_beta"],
        },
        "vision_encoder": {
            "image_token_id": config.image_token_id,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": config.spatial_merge_size,
            "hidden_size": vision.hidden_size,
            "num_channels": vision.num_channels,
            "image_size": vision.image_size,
            "max_image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "rope_theta": vision.rope_parameters["rope_theta"],
            "add_pre_mm_projector_layer_norm": True,
            "adapter_bias": config.multimodal_projector_bias,
        },
    }


def write_fp8_native(directory: Path, reference: Any, destination: Path) -> dict[str, torch.Tensor]:
    """Mistral's own per-tensor FP8 (``qscale_weight``, ``qscale_act``) on the text linears, q/k included."""
    params = json.loads((directory / "params.json").read_text())
    params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    tensors = native_tensors(reference)
    linear = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")
    for key in [k for k in tensors if linear.match(k)]:
        weight = tensors[key].float()
        scale = weight.abs().max() / 448.0
        codes = (weight / scale).to(torch.float8_e4m3fn)
        tensors[key] = codes
        tensors[key.replace(".weight", ".qscale_weight")] = scale
        tensors[key.replace(".weight", ".qscale_act")] = torch.tensor(1.0)
    destination.mkdir(exist_ok=True)
    (destination / "params.json").write_text(json.dumps(params))
    save_file(tensors, destination / "consolidated.safetensors")
    return tensors


def write_native(directory: Path, model: Mistral3ForConditionalGeneration) -> Path:
    """``model`` as a native BF16/F32 checkpoint: ``params.json`` and one ``consolidated.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_of(model.config)))
    save_file(native_tensors(model), directory / "consolidated.safetensors")
    return directory


# --- the MoE generation (MLA + experts): transformers' convert_mistral4_weight_to_hf run backwards ------------

MLA_TO_NATIVE = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attention.wq_a",
    "self_attn.q_a_layernorm": "attention.q_a_norm",
    "self_attn.q_b_proj": "attention.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a_with_mqa",
    "self_attn.kv_a_layernorm": "attention.kv_a_norm",
    "self_attn.kv_b_proj": "attention.wkv_b",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.gate": "gate",
    "mlp.shared_experts.gate_proj": "shared_experts.w1",
    "mlp.shared_experts.down_proj": "shared_experts.w2",
    "mlp.shared_experts.up_proj": "shared_experts.w3",
}
"""transformers' Mistral4 conversion renamings, reversed: HF module path under a text layer -> native."""


def mla_native_tensors(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A ``Mistral3ForConditionalGeneration`` (``mistral4`` text) state dict under native names: experts split
    into ``experts.E.w1/w3`` (gate rows, then up) and ``w2``, vision q/k back in rotary order, MLA text as is."""
    text = config.text_config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        value = tensor.detach().clone()
        layer = re.match(
            r"^model\.language_model\.layers\.(\d+)\.(.+)\.(weight|gate_up_proj|down_proj)$", name
        )
        if layer is None:
            if name.startswith("model.vision_tower") and name.endswith(("q_proj.weight", "k_proj.weight")):
                value = unpermute_for_rope(value, config.vision_config.num_attention_heads)
            out[native_key(name)] = value.contiguous()
            continue
        n, module, leaf = layer.groups()
        if module == "mlp.experts":
            width = text.moe_intermediate_size
            for e in range(text.n_routed_experts):
                if leaf == "gate_up_proj":
                    out[f"layers.{n}.experts.{e}.w1.weight"] = value[e, :width].contiguous()
                    out[f"layers.{n}.experts.{e}.w3.weight"] = value[e, width:].contiguous()
                else:
                    out[f"layers.{n}.experts.{e}.w2.weight"] = value[e].contiguous()
            continue
        out[f"layers.{n}.{MLA_TO_NATIVE[module]}.weight"] = value.contiguous()
    return out


def mla_params_of(config: Any) -> dict[str, Any]:
    """The ``params.json`` of a Large-3-shaped release for ``config`` (yarn ``apply_scale: false``, Llama-4
    scaling, the vision encoder as a Ministral 3 release writes it)."""
    text = config.text_config
    rope = text.rope_parameters
    vision = params_of(config)["vision_encoder"]
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
            "num_expert_groups": text.n_group,
            "num_expert_groups_per_tok": text.topk_group,
            "num_experts": text.n_routed_experts,
            "num_experts_per_tok": text.num_experts_per_tok,
            "num_shared_experts": text.n_shared_experts,
            "route_every_n": 1,
            "routed_scale": text.routed_scaling_factor,
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
        "vision_encoder": vision,
    }


def mla_model(seed: int = 0) -> Mistral3ForConditionalGeneration:
    """The tiny Mistral 4 VLM of ``mistral4_checkpoints`` with what the native format can say: yarn without
    magnitude correction (``mscale`` 1, 1) and Mistral's SiLU-gated vision FFN; norms and router perturbed."""
    from mistral4_checkpoints import tiny_config

    config = tiny_config()
    config.text_config.rope_parameters["mscale_all_dim"] = 1.0
    config.vision_config.hidden_act = "silu"
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


def write_mla_fp8_native(model: Mistral3ForConditionalGeneration, directory: Path) -> Path:
    """``model`` (MLA + experts) as a native checkpoint with Mistral's own per-tensor FP8 (``qscale_weight``,
    dynamic activations) on every 2-D text linear, each expert's ``w1/w2/w3`` its own scale; router, norms,
    embeddings, head and vision BF16."""
    tensors = mla_native_tensors(model.state_dict(), model.config)
    linear = re.compile(
        r"^layers\.\d+\.(attention\.w\w+|feed_forward\.w\d|shared_experts\.w\d|experts\.\d+\.w\d)\.weight$"
    )
    out = {}
    for key, value in tensors.items():
        if linear.match(key):
            weight = value.float()
            scale = weight.abs().max() / 448.0
            out[key] = (weight / scale).to(torch.float8_e4m3fn)
            out[key.replace(".weight", ".qscale_weight")] = scale
        else:
            out[key] = value.to(torch.bfloat16).contiguous()
    params = mla_params_of(model.config)
    params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "NO_SCALES"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    save_file(out, directory / "consolidated.safetensors")
    return directory


# --- Mistral Large 3's form, small: MLA + per-expert experts, compressed-tensors FP8_BLOCK -------------------

MLA_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
    "partial_rotary_factor": 0.5,
}
"""What the params.json translation gives an MLA model (``yarn.apply_scale: false``, Llama-4 scaling)."""


def tiny_mla_model(seed: int = 3, **text_overrides: Any) -> Mistral3ForConditionalGeneration:
    """A tiny Large-3-shaped VLM (``tests/mistral4_checkpoints``' text sizes, ``text_overrides`` applied; a
    SiLU Pixtral tower), fp32, seeded, the router spread so that routing depends on it."""
    from mistral4_checkpoints import tiny_text_config
    from transformers import Mistral3Config, PixtralVisionConfig

    from automodel_plugins.testing.tiny_models import TINY_PIXTRAL_SIZES

    config = Mistral3Config(
        text_config=tiny_text_config(
            rope_parameters=dict(MLA_ROPE), norm_topk_prob=True, routed_scaling_factor=1.0, **text_overrides
        ),
        vision_config=PixtralVisionConfig(**{**TINY_PIXTRAL_SIZES, "hidden_act": "silu"}),
        image_token_id=10,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


LARGE_3_IGNORE = [
    "model.embed_tokens",
    "re:patch_merger.*",
    "re:vision_encoder.*",
    "re:vision_language_adapter.*",
    "re:.*kv_a_proj_with_mqa$",
    "re:.*q_a_proj$",
    "re:.*gate$",
    "lm_head",
]
"""The ``ignore`` list of Large 3's real ``params.json``, as published."""


FP8_MAX = 448.0


def compressed_tensors(block: int, ignore: list[str]) -> dict[str, Any]:
    """Large 3's ``quantization_config`` with ``block`` x ``block`` blocks."""
    return {
        "config_groups": {
            "FP8_BLOCK": {
                "format": "float-quantized",
                "input_activations": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": True,
                    "group_size": 128,
                    "num_bits": 8,
                    "observer": None,
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    "type": "float",
                },
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": [block, block],
                    "dynamic": False,
                    "group_size": None,
                    "num_bits": 8,
                    "observer": "static_minmax",
                    "observer_kwargs": {},
                    "strategy": "block",
                    "symmetric": True,
                    "type": "float",
                },
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.3.dev29+g73c2cf9.d20251119",
    }


def expand(grid: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """Each block's scale over its (possibly partial) block."""
    return grid.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize(weight: torch.Tensor, block: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes and a ``scale_dtype`` grid of ``block`` x ``block`` scales (amax / 448 per block)."""
    rows, cols = weight.shape
    grid = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            part = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            grid[i, j] = (part.abs().amax() / FP8_MAX).clamp(min=1e-8)
    grid = grid.to(scale_dtype)
    codes = (weight.float() / expand(grid.float(), weight.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return codes.to(torch.float8_e4m3fn), grid


QUANTIZED_LEAVES = ("wq_b", "wkv_b", "wo", "w1", "w2", "w3")
"""Text linears Large 3 quantizes (``wq_a``, ``wkv_a_with_mqa`` and the router ``gate`` are ignored)."""


def write_large3_like(
    model: Mistral3ForConditionalGeneration, directory: Path, scale_name: str, *, block: int = 16
) -> Path:
    """:func:`tiny_mla_model` in Large 3's published form, small: compressed-tensors FP8_BLOCK (``block``) on the
    text linears its ignore list leaves (``weight_scale`` in BF16, as llm-compressor writes it, or Mistral's
    ``qscale_weight`` in fp32), everything else BF16, per-expert ``experts.E.w1/w2/w3``."""
    directory.mkdir(parents=True)
    scale_dtype = torch.bfloat16 if scale_name == "weight_scale" else torch.float32
    tensors = {}
    for key, value in mla_native_tensors(model.state_dict(), model.config).items():
        module = key.removesuffix(".weight").rpartition(".")[2]
        if key.startswith("layers.") and key.endswith(".weight") and module in QUANTIZED_LEAVES:
            codes, grid = quantize(value, block, scale_dtype)
            tensors[key] = codes
            tensors[key.removesuffix("weight") + scale_name] = grid
        else:
            tensors[key] = value.to(torch.bfloat16)  # what Large 3 ignores is BF16 on disk
    params = mla_params_of(model.config)
    params["quantization_config"] = compressed_tensors(block, LARGE_3_IGNORE)
    (directory / "params.json").write_text(json.dumps(params))
    save_file(tensors, directory / "consolidated.safetensors")
    return directory
