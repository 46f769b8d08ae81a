"""Digits that ``str.isdigit`` accepts and ``int`` refuses ('²', '³', '¹⁰') never reach ``int``: a checkpoint key
or a hub header carrying them is a name, or a malformed header, not a raw ``ValueError``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from automodel_plugins import describe_checkpoint, from_pretrained
from automodel_plugins.errors import AutomodelPluginsError
from automodel_plugins.pipeline.load.preflight import layer_lists
from automodel_plugins.sources.hub import _content_range
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.tiny_models import tiny_llama_config


def test_superscript_digits_are_not_list_indices() -> None:
    assert "²".isdigit()  # the trap: int("²") raises ValueError
    lists = layer_lists(["model.layers.0.mlp.weight", "model.layers.².mlp.weight"])
    assert lists == {"model.layers": {0}}


@pytest.mark.parametrize("header", ["bytes ²-³/10", "bytes 0-9/¹⁰"])
def test_a_content_range_with_superscripts_is_malformed(header: str) -> None:
    first, last, size = _content_range(header)
    assert size is None
    assert (first, last) in ((None, None), (0, 9))


def test_a_checkpoint_key_with_a_superscript_layer_is_a_typed_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = write_fp8_checkpoint(LlamaForCausalLM(tiny_llama_config()), tmp_path / "ckpt")
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.².mlp.down_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(AutomodelPluginsError, match=r"layers\.²"):
        describe_checkpoint(path)
    with pytest.raises(AutomodelPluginsError, match=r"layers\.²"):
        from_pretrained(path)
