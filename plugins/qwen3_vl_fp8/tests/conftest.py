"""A tiny Qwen3-VL and a batch holding one image, for the plugin's tests.

Text: hidden 64, 2 layers, 4 heads / 2 KV heads of 16, vocab 256, intermediate 200 (not a multiple of any
block size used), M-RoPE. Vision: one block of hidden 32, deepstack at layer 0, 8-pixel patches merged 2x2.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch, tiny_qwen3_vl_config

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
    return qwen3_vl_image_batch(tiny_config(), seq=SEQ, grid_thw=GRID_THW)


@pytest.fixture
def image_inputs(image_batch: dict[str, Any]) -> dict[str, Any]:
    """The image batch without labels: what a logits comparison feeds both models."""
    return {k: v for k, v in image_batch.items() if k != "labels"}
