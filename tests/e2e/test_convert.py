"""``automodel-plugins convert SRC DST --to ...``: streaming, and what it writes is what loading SRC gives.

References: ``from_pretrained(SRC).state_dict()`` read back by stock transformers, stock ``save_pretrained``
of that model, the source's own FP8 bytes, and a block quantization written here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mistral3_checkpoints import (
    ODD,
    Checkpoints,
    CheckpointSpec,
    ModelSpec,
    assert_same_weights,
    checkpoint_tensors,
    stock_load,
)

import automodel_plugins.pipeline.save.values as save_values
from automodel_plugins import from_pretrained
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.cli import main
from automodel_plugins.registry import Registry

from .test_save_fp8 import reference_fp8_block, same_bytes

SOURCES = {
    "per-tensor-legacy": CheckpointSpec(),
    "block-partial-edges": CheckpointSpec(model=ODD, block_size=(32, 32), scale_dtype=torch.bfloat16),
    "runtime-tied": CheckpointSpec(model=ModelSpec(tie=True), layout="runtime", shards=2),
}


@pytest.fixture(autouse=True)
def only_the_plugin(registry: Registry) -> Iterator[None]:
    """The CLI asks the process default registry: make it the plugin alone."""
    from automodel_plugins.registry import set_registry

    previous = set_registry(registry)
    yield
    set_registry(previous)


def convert(*args: str) -> int:
    return main(["convert", *map(str, args), "--no-progress"])


@pytest.mark.parametrize("spec", list(SOURCES.values()), ids=list(SOURCES))
def test_to_bf16_is_what_from_pretrained_holds_read_back_by_stock_transformers(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, tmp_path: Path, capsys
) -> None:
    source = checkpoints(spec)
    assert convert(source, tmp_path / "bf16", "--to", "bf16") == 0
    assert "wrote" in capsys.readouterr().out
    loaded = from_pretrained(source, registry=registry)
    converted = stock_load(tmp_path / "bf16")
    assert_same_weights(converted, loaded)
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    loaded.save_pretrained(
        tmp_path / "stock"
    )  # the same tensors through stock save_pretrained: the same files
    for file in (tmp_path / "stock").glob("*.safetensors"):
        assert (tmp_path / "bf16" / file.name).read_bytes() == file.read_bytes(), file.name


def test_convert_streams_a_chunk_of_rows_at_a_time(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of ~1000 elements, no read is bigger than a chunk (or one row), and the output is the same."""
    source = checkpoints()
    monkeypatch.setattr(save_values, "CHUNK_ELEMENTS", 1000)
    largest = {"elements": 0}
    real_read = Checkpoint.read

    def read(self, key, region=None):
        tensor = real_read(self, key, region)
        largest["elements"] = max(largest["elements"], tensor.numel())
        return tensor

    monkeypatch.setattr(Checkpoint, "read", read)
    assert convert(source, tmp_path / "small", "--to", "bf16") == 0
    with Checkpoint.open(source) as checkpoint:
        widest_row = max(checkpoint.info(key).shape[-1] for key in checkpoint if checkpoint.info(key).shape)
    assert 0 < largest["elements"] <= max(1000, widest_row)
    monkeypatch.undo()
    assert convert(source, tmp_path / "default", "--to", "bf16") == 0
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == (
        tmp_path / "default" / "model.safetensors"
    ).read_bytes()


def test_to_fp8_tensor_keeps_the_source_bytes(checkpoints: Checkpoints, tmp_path: Path) -> None:
    source = checkpoints()
    assert convert(source, tmp_path / "fp8", "--to", "fp8-tensor") == 0
    saved, original = checkpoint_tensors(tmp_path / "fp8"), checkpoint_tensors(source)
    for key, value in original.items():
        if key.endswith("activation_scale"):
            assert key not in saved  # transformers' FP8 format: dynamic activations
        else:
            assert same_bytes(saved[key], value), key
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["activation_scheme"] == "dynamic" and config["weight_block_size"] is None
    assert config["modules_to_not_convert"] == list(CheckpointSpec().modules_to_not_convert)


def test_to_fp8_block_from_a_bf16_checkpoint_is_what_stock_dequantizes(
    checkpoints: Checkpoints, tmp_path: Path
) -> None:
    source = checkpoints(quantized=False)
    assert convert(source, tmp_path / "fp8", "--to", "fp8-block", "--block", "16") == 0
    bf16 = checkpoint_tensors(source)
    stock = stock_load(tmp_path / "fp8").state_dict()
    saved = checkpoint_tensors(tmp_path / "fp8")
    name = "model.language_model.layers.1.self_attn.o_proj.weight"
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    expected, grid = reference_fp8_block(bf16[key], (16, 16))
    assert torch.equal(saved[key.removesuffix("weight") + "weight_scale_inv"], grid)
    assert torch.equal(stock[name], expected)
    assert saved["language_model.lm_head.weight"].dtype == torch.bfloat16  # transformers' default skip


def test_the_checkpoints_other_files_come_along(checkpoints: Checkpoints, tmp_path: Path) -> None:
    source = checkpoints.copy(tmp_path / "source")
    (source / "tokenizer.json").write_text('{"model": {}}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "generation_config.json").write_text('{"max_new_tokens": 7}')
    (source / "params.json").write_text("{}")
    (source / "consolidated.safetensors").write_bytes(b"not copied")
    assert convert(source, tmp_path / "out", "--to", "bf16", "--max-shard-size", "60000") == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"} <= names
    # Mistral's native layout (params.json describes consolidated.safetensors) is not what a conversion writes.
    assert "consolidated.safetensors" not in names and "params.json" not in names
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--to", "bf16"), "non-empty"),
        (("--to", "fp8-tensor", "--block", "16"), "--block applies"),
        (("--to", "fp8-block", "--block", "0"), "block_size must be"),
        (("--to", "bf16", "--max-shard-size", "big"), "max_shard_size"),
    ],
)
def test_bad_invocations_exit_2_with_one_line(
    checkpoints: Checkpoints, tmp_path: Path, capsys, args, message
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert convert(checkpoints(), dest, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_a_destination_inside_the_source_exits_2(checkpoints: Checkpoints, tmp_path: Path, capsys) -> None:
    source = checkpoints.copy(tmp_path / "source")
    assert convert(source, source / "bf16", "--to", "bf16") == 2
    assert "inside the source checkpoint" in capsys.readouterr().err and not (source / "bf16").exists()


def test_an_unknown_format_is_an_argparse_error(checkpoints: Checkpoints, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        convert(checkpoints(), tmp_path / "out", "--to", "int4")
    assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err
