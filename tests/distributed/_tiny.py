"""The tiny Mistral3 model, its FP8 checkpoints and inputs shared by the distributed workers.

Sizes are picked so that two ranks see every awkward case: an odd text hidden size (67: uneven dim-0
shards of norms and ``o_proj``/``down_proj``, 34 + 33 rows), an intermediate size of 72 (36 rows or columns a
rank, not a multiple of the 16x16 FP8 blocks), and an odd vocabulary (251: uneven embedding / head shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

BLOCK = (16, 16)
ALIGNED_BLOCK = (4, 4)
"""Blocks every 2-rank tensor-parallel boundary of the tiny model respects (q 32, k/v 16, gate/up 36 rows;
o 32, down 36 columns), where ``BLOCK``'s cut gate/up/down inside block 2."""
TEXT = {"hidden_size": 67, "intermediate_size": 72, "num_hidden_layers": 4, "vocab_size": 251}
VISION = {"num_hidden_layers": 2}
"""Where these differ from ``tiny_mistral3_config`` (its 4 heads / 2 KV heads of 16 and real YaRN rotary stay)."""
MODULES_TO_NOT_CONVERT = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
HUB_SOURCE = "hub-source"
"""Where, under the launch's output directory, the checkpoint the stand-in hub serves is written."""
HUB_REPOS = {
    "hub_fsdp": "dist/tiny-fsdp",
    "hub_pipeline": "dist/tiny-stages",
    "hub_one_rank": "dist/tiny-one-rank",
}
"""The repo each hub scenario loads (one each, so that each starts from an empty cache)."""


def build_config(*, tie_word_embeddings: bool) -> Any:
    """The tiny ``Mistral3Config`` (Ministral 3 text model, Pixtral tower, YaRN rotary)."""
    return tiny_mistral3_config(**TEXT, vision=VISION, tie_word_embeddings=tie_word_embeddings)


def legacy_rename(name: str) -> str:
    """Runtime name -> legacy (nested) checkpoint key, with the plugin's own rules."""
    from automodel_plugins_mistral3_fp8.layout import LEGACY_RENAMES

    from automodel_plugins.adapters import PrefixRenames

    return PrefixRenames(LEGACY_RENAMES).to_checkpoint(name)


def write_checkpoint(
    directory: Path, *, block_size: tuple[int, int] | None, tie_word_embeddings: bool, seed: int = 0
) -> Path:
    """A random tiny model written as an FP8 checkpoint (legacy layout, 2 shards + index)."""
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(build_config(tie_word_embeddings=tie_word_embeddings))
    _perturb_norms(model)
    return write_fp8_checkpoint(
        model,
        directory,
        block_size=block_size,
        rename=legacy_rename,
        modules_to_not_convert=MODULES_TO_NOT_CONVERT,
        shards=2,
    )


TEXT_ONLY = "ministral3_text"
"""The text-only Ministral 3 checkpoint (``Ministral3ForCausalLM``, Devstral 2's class): the same text sizes,
runtime keys (``model.layers.*``), per-tensor FP8 with static activation scales, 2 shards."""


MOE = "qwen3_vl_moe_per_expert"
"""The tiny Qwen3-VL-MoE checkpoint, in the FP8 releases' form: one 16x16-block FP8 tensor per expert and
projection (5 experts: 3 + 2 a rank; gate/up 24 x 72 and down 72 x 24, partial blocks on both axes; hidden 72:
down_proj rows split 36 + 36, inside a block; 72 rather than an odd size, which torch's grouped expert matmul
refuses in BF16, strides not being multiples of 16 bytes), routers BF16, 2 shards."""
MOE_TEXT = {"hidden_size": 72, "vocab_size": 251, "num_experts": 5}
MOE_NOT_CONVERTED = (
    "model.visual",
    "lm_head",
    "model.language_model.layers.0.mlp.gate",
    "model.language_model.layers.1.mlp.gate",
)


MOE_ALIGNED = "qwen3_vl_moe_aligned"
"""The same, with every expert piece on 16x16 block boundaries (hidden 48, expert intermediate 32: gate/up
32 x 48, down 48 x 32), so ``dequantize=False`` keeps the experts FP8 (``Fp8Experts``)."""
MOE_ALIGNED_TEXT = {"hidden_size": 48, "moe_intermediate_size": 32, "vocab_size": 251, "num_experts": 5}


def moe_config(aligned: bool = False) -> Any:
    from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

    return tiny_qwen3_vl_moe_config(**(MOE_ALIGNED_TEXT if aligned else MOE_TEXT))


def write_moe_checkpoint(directory: Path, *, seed: int = 0, aligned: bool = False) -> Path:
    from transformers import Qwen3VLMoeForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(moe_config(aligned))
    _perturb_norms(model)
    return write_fp8_checkpoint(
        model,
        directory,
        block_size=BLOCK,
        activation_scale_name=None,
        modules_to_not_convert=MOE_NOT_CONVERTED,
        shards=2,
        experts="per-expert",
        quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"},
    )


def moe_inputs(*, seed: int = 1, aligned: bool = False, batch: int = 2) -> dict[str, torch.Tensor]:
    """Rows of 12 tokens, the first holding one 4x4-patch image (4 image tokens), labels included."""
    from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch

    return qwen3_vl_image_batch(moe_config(aligned), seed=seed, batch=batch)


NATIVE = "mistral3_native_fp8"
"""A Mistral-native checkpoint (``params.json`` + ``consolidated.safetensors``, Mistral's per-tensor FP8)."""


def write_native_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """The tiny VLM (odd hidden size 67: uneven shards) in Mistral's native form, FP8 text linears, q/k rows in
    Mistral's rotary order (written by ``tests/mistral_native_checkpoints.py``, not the plugin)."""
    from mistral_native_checkpoints import write_fp8_native, write_native
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(
        tiny_mistral3_config(**TEXT, vision={**VISION, "hidden_act": "silu"})
    )
    _perturb_norms(model)
    plain = write_native(directory.with_name(directory.name + "-bf16"), model)
    write_fp8_native(plain, model, directory)
    return directory


def text_only_config() -> Any:
    from automodel_plugins.testing.tiny_models import tiny_ministral3_config

    return tiny_ministral3_config(**TEXT, tie_word_embeddings=False)


def write_text_only_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    from transformers import Ministral3ForCausalLM

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    model = Ministral3ForCausalLM(text_only_config())
    _perturb_norms(model)
    return write_fp8_checkpoint(model, directory, modules_to_not_convert=MODULES_TO_NOT_CONVERT, shards=2)


def text_inputs(*, seed: int = 1, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    from automodel_plugins.testing.tiny_models import text_batch

    return text_batch(text_only_config(), batch=batch, seq=seq, seed=seed)


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norms start at exactly 1: perturb them so that a misplaced row would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)


def inputs(*, seed: int = 1, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    """Token ids with one 32x32 image per row (4 image tokens after 2x2 merging), labels included."""
    config = build_config(tie_word_embeddings=False)
    return mistral3_image_batch(
        config, batch=batch, seq=seq, image_hw=(32, 32), seed=seed, attention_mask=False
    )


def reference(path: Path) -> Any:
    """The single-process load: ``automodel_plugins.from_pretrained`` of the whole checkpoint."""
    import automodel_plugins

    return automodel_plugins.from_pretrained(path)
