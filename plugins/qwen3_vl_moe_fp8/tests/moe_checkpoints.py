"""A tiny Qwen3-VL-MoE, its checkpoints in every on-disk form of the experts, and an FP8 reference
dequantization written here, independently of the host (the fixtures are in ``conftest.py``).

Text: hidden 64, 2 MoE layers of 4 experts (2 per token), expert intermediate 24 (``2I = 48 != H``: stock's fused
loader cannot tell the orientations apart when they are equal), 4 heads / 2 KV heads of 16, vocab 256, M-RoPE.
With 16x16 blocks every expert matrix has partial edge blocks (24 = 16 + 8). Vision: the tiny Qwen3-VL tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

PLUGIN = "qwen3_vl_moe_fp8"
LAYERS, EXPERTS, HIDDEN, INTERMEDIATE = 2, 4, 64, 24
QWEN_FP8 = {
    "activation_scale_name": None,
    "quantization_extra": {"activation_scheme": "dynamic", "fmt": "e4m3"},
}
"""What Qwen ships: dynamic activations (no activation scales on disk), e4m3."""
NOT_CONVERTED = (
    "model.visual",
    "lm_head",
    *(f"model.language_model.layers.{i}.mlp.gate" for i in range(LAYERS)),
)
"""The release's ``modules_to_not_convert`` pattern: the vision tower, the head, every layer's router."""
GRID_THW = (1, 4, 4)  # one frame of 4x4 patches: 4 image tokens after the 2x2 merge
SEQ = 12


def tiny_config() -> Qwen3VLMoeConfig:
    return tiny_qwen3_vl_moe_config()


def tiny_model(seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    """The tiny model in fp32, seeded; norms perturbed off 1 so that a misplaced tensor would show."""
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_moe_checkpoint(
    model: torch.nn.Module,
    directory: Path,
    *,
    experts: str,
    block_size: tuple[int, int] | None = (16, 16),
    fp8: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """``model`` with its experts in ``experts`` form: FP8 (attention and experts, ``block_size`` blocks) or,
    with ``fp8=False``, BF16 without a quantization_config (the BF16 release)."""
    write_fp8_checkpoint(
        model,
        directory,
        block_size=block_size,
        scale_dtype=scale_dtype,
        modules_to_not_convert=NOT_CONVERTED,
        quantized=None if fp8 else (lambda name: False),
        shards=shards,
        experts=experts,
        fp8_experts=fp8,
        **QWEN_FP8,
    )
    if not fp8:
        config = json.loads((directory / "config.json").read_text())
        del config["quantization_config"]
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_stock(path: Path) -> Qwen3VLMoeForConditionalGeneration:
    """Stock transformers' own load of ``path`` in BF16, its load report silenced."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    finally:
        logging.set_verbosity(verbosity)


# --- the reference: read and dequantized here, assembled by hand ---------------------------------------------


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors itself."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def same_bytes(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any byte (or exist on one side only)."""
    different = sorted(set(first) ^ set(second))
    for key in set(first) & set(second):
        a, b = first[key], second[key]
        if (
            a.dtype != b.dtype
            or a.shape != b.shape
            or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        ):
            different.append(key)
    return different


def reference_dequant(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """``w.float() * s`` with each block's scale repeated over its (partial) block, matrix by matrix."""
    if block is None:
        return weight.float() * scale.float()
    if weight.dim() == 3:
        return torch.stack([reference_dequant(w, s, block) for w, s in zip(weight, scale, strict=True)])
    rows, cols = weight.shape
    expanded = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * expanded


def reference_state_dict(directory: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's state dict from the checkpoint: FP8 dequantized (fp32 product, one cast), the experts put
    together by hand from whichever form they are stored in (per expert: ``stack(cat(gate, up))``; fused
    transposed: ``transpose(1, 2)``)."""
    stored = stored_tensors(directory)
    quantization = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    block = quantization.get("weight_block_size")
    values: dict[str, torch.Tensor] = {}
    for key, tensor in stored.items():
        if key.endswith("scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale_key = (
                key.removesuffix("weight") + "weight_scale_inv"
                if key.endswith("weight")
                else key + "_scale_inv"
            )
            values[key] = reference_dequant(tensor, stored[scale_key], block)
        else:
            values[key] = tensor.float()
    out: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        prefix = f"model.language_model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" in values:
            gates = [values.pop(f"{prefix}.{e}.gate_proj.weight") for e in range(EXPERTS)]
            ups = [values.pop(f"{prefix}.{e}.up_proj.weight") for e in range(EXPERTS)]
            downs = [values.pop(f"{prefix}.{e}.down_proj.weight") for e in range(EXPERTS)]
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat(pair) for pair in zip(gates, ups, strict=True)]
            )
            out[f"{prefix}.down_proj"] = torch.stack(downs)
        elif values[f"{prefix}.gate_up_proj"].shape[1] == HIDDEN:  # fused, transposed: [E, H, 2I]
            out[f"{prefix}.gate_up_proj"] = values.pop(f"{prefix}.gate_up_proj").transpose(1, 2)
            out[f"{prefix}.down_proj"] = values.pop(f"{prefix}.down_proj").transpose(1, 2)
    out.update(values)
    return {name: value.to(dtype) for name, value in out.items()}


def reference_model(
    directory: Path, dtype: torch.dtype = torch.bfloat16
) -> Qwen3VLMoeForConditionalGeneration:
    """The stock class from the config (unquantized) holding :func:`reference_state_dict`."""
    from automodel_plugins.sources import load_config

    config = load_config(directory)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=dtype)
    result = model.load_state_dict(reference_state_dict(directory, dtype), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()
