"""Fixtures of the Qwen3-VL-MoE plugin's tests: the tiny model, its checkpoints (written once a session) and a
batch holding one image. The helpers and the reference are in ``moe_checkpoints.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from moe_checkpoints import GRID_THW, SEQ, tiny_config, tiny_model, write_moe_checkpoint
from transformers import Qwen3VLMoeForConditionalGeneration

from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch


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
    return qwen3_vl_image_batch(tiny_config(), seq=SEQ, grid_thw=GRID_THW)


@pytest.fixture
def image_inputs(image_batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in image_batch.items() if k != "labels"}
