"""A tiny Mistral 4 (Mistral Small 4's HF form: ``Mistral3ForConditionalGeneration`` + a ``mistral4`` text model),
written here in each on-disk form of its experts, and an FP8 reference dequantization written here too,
independently of the host.

Text: hidden 64, 3 layers (``first_k_dense_replace=1``: layer 0 dense, layers 1-2 MoE), 4 routed experts (2 per
token), one shared expert, expert intermediate 24 (``2I = 48 != H``), MLA with ``q_lora_rank`` 48,
``kv_lora_rank`` 32, ``qk_rope_head_dim`` 8 (``kv_a_proj_with_mqa`` has 40 = 32 + 8 outputs: with 16x16 blocks a
partial edge block, as Small 4's 576 = 512 + 64 has with 128x128), yarn (``mscale`` 1, ``mscale_all_dim`` 0.5: the
rotary's ``attention_scaling`` and the attention's softmax scale both move) with Llama-4 attention scaling. Vision:
the tiny Pixtral tower. Keys in the legacy layout (``language_model.model.*``), as Small 4's ``config.json``
repo stores them.

Forms: ``per-tensor`` (Small 4: every text linear FP8 with a 0-d ``weight_scale_inv`` and ``activation_scale``,
fused experts with one scale per expert ``[E, 1, 1]`` shared by gate and up, activation scales ``[E]``);
``block-fused`` and ``block-per-expert`` (fine-grained FP8, 16x16 blocks, ``weight_scale_inv`` grids: fused with
one grid per expert, or one 2-D tensor per expert and projection); ``bf16`` (no quantization_config, fused).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Mistral4Config,
    Mistral4ForCausalLM,
    PixtralVisionConfig,
)

from automodel_plugins.testing.tiny_models import TINY_PIXTRAL_SIZES

PLUGIN = "mistral3_fp8"
LAYERS, EXPERTS, HIDDEN, INTERMEDIATE = 3, 4, 64, 24
BLOCK = (16, 16)
FORMS = ("per-tensor", "block-fused", "block-per-expert", "bf16")
NOT_CONVERTED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.5,
    "llama_4_scaling_beta": 0.1,
}
_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_FP8_MAX = 448.0


def tiny_text_config(**overrides: Any) -> Mistral4Config:
    sizes: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "intermediate_size": 96,
        "moe_intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "first_k_dense_replace": 1,
        "n_routed_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 32,
        "rope_parameters": dict(ROPE),
        "tie_word_embeddings": False,
    }
    return Mistral4Config(**{**sizes, **overrides})


def tiny_config() -> Mistral3Config:
    return Mistral3Config(
        text_config=tiny_text_config(),
        vision_config=PixtralVisionConfig(**TINY_PIXTRAL_SIZES),
        image_token_id=10,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0) -> Mistral3ForConditionalGeneration:
    """The tiny model in fp32, seeded; norms and the router perturbed so that a misplaced tensor would show."""
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


def legacy_key(name: str) -> str:
    """A VLM's runtime name in the legacy layout (``language_model.model.*``)."""
    for model, checkpoint in _LEGACY:
        if name.startswith(model):
            return checkpoint + name[len(model) :]
    return name


def is_quantized(name: str) -> bool:
    """The text stack's linear weights (attention, dense MLP, shared experts) and the fused experts: not the
    router, norms, embeddings, head or vision."""
    if (
        not name.startswith("model.language_model.layers.")
        or "norm" in name
        or name.endswith("mlp.gate.weight")
    ):
        return False
    return name.endswith(
        ("_proj.weight", "_proj_with_mqa.weight", "experts.gate_up_proj", "experts.down_proj")
    )


def _per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (weight.abs().amax().float() / _FP8_MAX).clamp(min=1e-12)
    return (weight / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), scale


def _blocks(weight: torch.Tensor, size: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    grid = torch.zeros(math.ceil(rows / size[0]), math.ceil(cols / size[1]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            block = weight[i * size[0] : (i + 1) * size[0], j * size[1] : (j + 1) * size[1]]
            grid[i, j] = (block.abs().amax() / _FP8_MAX).clamp(min=1e-12)
    expanded = _expand(grid, weight.shape, size)
    return (weight / expanded).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), grid


def _expand(grid: torch.Tensor, shape: tuple[int, ...], size: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return grid.repeat_interleave(size[0], 0)[:rows].repeat_interleave(size[1], 1)[:, :cols]


def write_checkpoint(
    model: torch.nn.Module, directory: Path, form: str, *, block: tuple[int, int] = BLOCK
) -> Path:
    """``model`` in ``form`` (see the module docstring; block forms in ``block`` blocks), legacy keys, one
    safetensors file and a config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    vlm = isinstance(model, Mistral3ForConditionalGeneration)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        value = value.detach().to(torch.bfloat16 if form == "bf16" else torch.float32)
        key = legacy_key(name) if vlm else name
        if form == "bf16" or not is_quantized(name):
            tensors[key] = value.to(torch.bfloat16).contiguous()
            continue
        fused = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if fused and form == "block-per-expert":
            prefix, _, parameter = key.rpartition(".")
            parts = ("gate_proj", "up_proj") if parameter == "gate_up_proj" else ("down_proj",)
            for expert in range(value.shape[0]):
                for part, piece in zip(parts, value[expert].chunk(len(parts), 0), strict=True):
                    codes, grid = _blocks(piece.contiguous(), block)
                    tensors[f"{prefix}.{expert}.{part}.weight"] = codes
                    tensors[f"{prefix}.{expert}.{part}.weight_scale_inv"] = grid
        elif fused and form == "block-fused":
            pairs = [_blocks(matrix, block) for matrix in value]
            tensors[key] = torch.stack([codes for codes, _ in pairs])
            tensors[f"{key}_scale_inv"] = torch.stack([grid for _, grid in pairs])
        elif fused:  # per-tensor: one scale per expert, gate and up sharing it
            pairs = [_per_tensor(matrix) for matrix in value]
            tensors[key] = torch.stack([codes for codes, _ in pairs])
            tensors[f"{key}_scale_inv"] = torch.stack([scale for _, scale in pairs]).reshape(-1, 1, 1)
            tensors[f"{key}_activation_scale"] = torch.rand(value.shape[0]) + 0.5
        else:
            codes, scale = _per_tensor(value) if form == "per-tensor" else _blocks(value, block)
            base = key.removesuffix("weight")
            tensors[key] = codes
            tensors[base + "weight_scale_inv"] = scale
            if form == "per-tensor":
                tensors[base + "activation_scale"] = torch.rand(()) + 0.5
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    if form != "bf16":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "static" if form == "per-tensor" else "dynamic",
            "weight_block_size": None if form == "per-tensor" else list(block),
            "dequantize": False,
            "modules_to_not_convert": NOT_CONVERTED,
        }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# --- the reference: read and dequantized here, assembled by hand ---------------------------------------------


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def reference_state_dict(directory: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The runtime state dict: FP8 times its scale in fp32 (0-d, ``[E, 1, 1]`` broadcast, or each block's scale
    over its partial block), cast once; per-expert pieces stacked by hand (``stack(cat(gate, up))``)."""
    stored = stored_tensors(directory)
    quantization = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    size = tuple(quantization.get("weight_block_size") or BLOCK)
    values: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in stored.items():
        if key.endswith(("scale_inv", "activation_scale")):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale_key = f"{key}_scale_inv" if not key.endswith("weight") else key[:-6] + "weight_scale_inv"
            scale = stored[scale_key].float()
            if scale.dim() == 2:
                value = tensor.float() * _expand(scale, tensor.shape, size)
            elif scale.dim() == 3 and scale.shape[1:] != (1, 1):
                value = torch.stack(
                    [w.float() * _expand(s, w.shape, size) for w, s in zip(tensor, scale, strict=True)]
                )
            else:
                value = tensor.float() * scale
            tensor = value.to(dtype)
        else:
            tensor = tensor.to(dtype)
        parts = key.split(".mlp.experts.")
        if len(parts) == 2 and parts[1][0].isdigit():
            expert, projection, _ = parts[1].split(".")
            per_expert.setdefault(parts[0], {}).setdefault(int(expert), {})[projection] = tensor
            continue
        values[key] = tensor
    for layer, experts in per_expert.items():
        order = sorted(experts)
        values[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order]
        )
        values[f"{layer}.mlp.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    if json.loads((directory / "config.json").read_text())["model_type"] == "mistral4":
        return values  # text-only: keys are the module tree's names
    inverse = {checkpoint: model for model, checkpoint in _LEGACY}
    out = {}
    for key, value in values.items():
        prefix = next((p for p in sorted(inverse, key=len, reverse=True) if key.startswith(p)), "")
        out[(inverse[prefix] + key[len(prefix) :]) if prefix else key] = value
    return out


def tiny_text_model(seed: int = 0) -> Mistral4ForCausalLM:
    """The text-only tiny model (``Mistral4ForCausalLM``), fp32, seeded, norms and router perturbed."""
    torch.manual_seed(seed)
    config = tiny_text_config(architectures=["Mistral4ForCausalLM"])
    model = Mistral4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


def reference_model(directory: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The stock class of the checkpoint's config (``Mistral3ForConditionalGeneration`` or
    ``Mistral4ForCausalLM``) built at normal init (real rotary buffers), holding :func:`reference_state_dict`,
    strictly."""
    raw = json.loads((directory / "config.json").read_text())
    raw.pop("quantization_config", None)
    text_only = raw["model_type"] == "mistral4"
    config = Mistral4Config.from_dict(raw) if text_only else Mistral3Config.from_dict(raw)
    cls = Mistral4ForCausalLM if text_only else Mistral3ForConditionalGeneration
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=dtype)
    model.load_state_dict(reference_state_dict(directory, dtype), strict=True)
    return model.eval()
