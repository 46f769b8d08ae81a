"""The tiny Mistral3 model, its FP8 checkpoints and inputs shared by the distributed workers.

Sizes are picked so that two ranks see every awkward case: an odd text hidden size (67: uneven dim-0
shards of norms and ``o_proj``/``down_proj``, 34 + 33 rows), an intermediate size of 72 (36 rows or columns a
rank, not a multiple of the 16x16 FP8 blocks), and an odd vocabulary (251: uneven embedding / head shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BLOCK = (16, 16)
IMAGE_TOKEN_ID = 10
TEXT = {
    "hidden_size": 67,
    "intermediate_size": 72,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 251,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 16,
    "image_size": 64,
    "patch_size": 8,
}
MODULES_TO_NOT_CONVERT = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def build_config(*, tie_word_embeddings: bool) -> Any:
    """The tiny ``Mistral3Config`` (Ministral 3 text model, Pixtral tower, YaRN rotary)."""
    from transformers import Mistral3Config, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    return Mistral3Config(
        text_config=Ministral3Config(**TEXT),
        vision_config=PixtralVisionConfig(**VISION),
        image_token_id=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
        tie_word_embeddings=tie_word_embeddings,
    )


def legacy_rename(name: str) -> str:
    """Runtime name -> legacy (nested) checkpoint key, with the plugin's own rules."""
    from automodel_plugins_mistral3_fp8.layout import LEGACY_RENAMES

    from automodel_plugins.adapter import _rename

    return _rename(name, sorted(LEGACY_RENAMES, key=lambda r: -len(r.model)), to_checkpoint=True)


def write_checkpoint(
    directory: Path, *, block_size: tuple[int, int] | None, tie_word_embeddings: bool, seed: int = 0
) -> Path:
    """A random tiny model written as an FP8 checkpoint (legacy layout, 2 shards + index)."""
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(build_config(tie_word_embeddings=tie_word_embeddings))
    with torch.no_grad():  # norms start at exactly 1: perturb them so a misplaced row would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return write_fp8_checkpoint(
        model,
        directory,
        block_size=block_size,
        rename=legacy_rename,
        modules_to_not_convert=MODULES_TO_NOT_CONVERT,
        shards=2,
    )


def inputs(*, seed: int = 1, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    """Token ids with one 32x32 image per row (4 image tokens after 2x2 merging), labels included."""
    generator = torch.Generator().manual_seed(seed)
    vocab = TEXT["vocab_size"]
    ids = torch.randint(11, vocab, (batch, seq), generator=generator)
    ids[:, 1:5] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :5] = -100
    pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)
    image_sizes = torch.tensor([[32, 32]] * batch)
    return {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes, "labels": labels}


def reference(path: Path) -> Any:
    """The single-process load: ``automodel_plugins.from_pretrained`` of the whole checkpoint."""
    import automodel_plugins

    return automodel_plugins.from_pretrained(path)
