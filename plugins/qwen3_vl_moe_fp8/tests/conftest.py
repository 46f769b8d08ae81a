"""Fixtures of the Qwen3-VL-MoE plugin's tests: the tiny model, its checkpoints (written once a session) and a
batch holding one image. The helpers and the reference are in ``moe_checkpoints.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from moe_checkpoints import (
    GRID_THW,
    IMAGE_TOKEN,
    SEQ,
    VISION_END,
    VISION_START,
    tiny_model,
    write_moe_checkpoint,
)
from transformers import Qwen3VLMoeForConditionalGeneration

from automodel_plugins.testing.tiny_models import TINY_QWEN3_VL_VISION


@pytest.fixture(scope="session")
def moe_model() -> Qwen3VLMoeForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="session")
def moe_checkpoint(
    moe_model: Qwen3VLMoeForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """``make(experts=..., **options) -> Path``, each distinct checkpoint written once for the session."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("qwen3_vl_moe")

    def make(**options: Any) -> Path:
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = write_moe_checkpoint(moe_model, root / f"ckpt{len(made)}", **options)
        return made[key]

    return make


@pytest.fixture
def image_batch() -> dict[str, Any]:
    """Two sequences, the first holding ``<vision_start> <image> x4 <vision_end>``; labels ignore the prompt."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VISION_END, (2, SEQ), generator=gen)
    input_ids[0, 2:8] = torch.tensor([VISION_START, *[IMAGE_TOKEN] * 4, VISION_END])
    labels = input_ids.clone()
    labels[0, :8] = -100
    labels[1, :2] = -100
    patch, temporal = TINY_QWEN3_VL_VISION["patch_size"], TINY_QWEN3_VL_VISION["temporal_patch_size"]
    patches = GRID_THW[0] * GRID_THW[1] * GRID_THW[2]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(patches, 3 * temporal * patch * patch, generator=gen),
        "image_grid_thw": torch.tensor([GRID_THW]),
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int(),
        "labels": labels,
    }


@pytest.fixture
def image_inputs(image_batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in image_batch.items() if k != "labels"}
