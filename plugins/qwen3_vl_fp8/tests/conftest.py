"""A tiny Qwen3-VL and a batch holding one image, for the plugin's tests.

Text: hidden 64, 2 layers, 4 heads / 2 KV heads of 16, vocab 256, intermediate 200 (not a multiple of any
block size used), M-RoPE. Vision: one block of hidden 32, deepstack at layer 0, 8-pixel patches merged 2x2.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from automodel_plugins.testing.tiny_models import (
    QWEN3_VL_IMAGE_TOKEN_ID,
    QWEN3_VL_VISION_END_TOKEN_ID,
    QWEN3_VL_VISION_START_TOKEN_ID,
    TINY_QWEN3_VL_VISION,
    tiny_qwen3_vl_config,
)

IMAGE_TOKEN, VISION_START, VISION_END = (
    QWEN3_VL_IMAGE_TOKEN_ID,
    QWEN3_VL_VISION_START_TOKEN_ID,
    QWEN3_VL_VISION_END_TOKEN_ID,
)
PATCH, TEMPORAL_PATCH = TINY_QWEN3_VL_VISION["patch_size"], TINY_QWEN3_VL_VISION["temporal_patch_size"]
GRID_THW = (1, 4, 4)  # one frame of 4x4 patches: 16 patches, 4 image tokens after the 2x2 merge
SEQ = 12


def tiny_config() -> Qwen3VLConfig:
    return tiny_qwen3_vl_config(intermediate_size=200)


@pytest.fixture
def qwen_config() -> Qwen3VLConfig:
    """A fresh tiny config (tests may set ``quantization_config`` on it)."""
    return tiny_config()


@pytest.fixture(scope="session")
def qwen_model() -> Qwen3VLForConditionalGeneration:
    """The tiny model in fp32, seeded: the source every test checkpoint is written from."""
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(tiny_config()).eval()


@pytest.fixture
def image_batch() -> dict[str, Any]:
    """Two sequences, the first holding ``<vision_start> <image> x4 <vision_end>``; labels ignore the prompt."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VISION_END, (2, SEQ), generator=gen)
    input_ids[0, 2:8] = torch.tensor([VISION_START, *[IMAGE_TOKEN] * 4, VISION_END])
    labels = input_ids.clone()
    labels[0, :8] = -100
    labels[1, :2] = -100
    patches = GRID_THW[0] * GRID_THW[1] * GRID_THW[2]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(patches, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=gen),
        "image_grid_thw": torch.tensor([GRID_THW]),
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int(),
        "labels": labels,
    }


@pytest.fixture
def image_inputs(image_batch: dict[str, Any]) -> dict[str, Any]:
    """The image batch without labels: what a logits comparison feeds both models."""
    return {k: v for k, v in image_batch.items() if k != "labels"}
