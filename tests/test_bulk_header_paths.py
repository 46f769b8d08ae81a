"""The headers-only fast paths answer exactly what the one-at-a-time paths answer.

``Fp8StateDictAdapter.assembled`` makes a fused tensor's pieces in C-level passes when they share one form, and
``layer_lists`` reads list indices per module form; each is compared here with a reference written in the test:
the adapter's own ``piece`` asked key by key, and a module-by-module split of the key names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from automodel_plugins import TensorSource
from automodel_plugins.adapters import fp8_adapter_for
from automodel_plugins.adapters.pieces import stacked_boxes
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import ScaleError
from automodel_plugins.pipeline.load.preflight import layer_lists

EXPERTS, ROWS, COLS = 3, 8, 16


class _Config:
    def __init__(self) -> None:
        self.quantization_config = {
            "quant_method": "fp8",
            "weight_block_size": [8, 8],
            "activation_scheme": "dynamic",
        }


def _write(directory: Path, *, scale_names: tuple[str, ...], activation: bool = False) -> Path:
    """One layer of per-expert FP8 gate/up weights; expert ``e`` scaled under ``scale_names[e % len]``."""
    tensors = {}
    for expert in range(EXPERTS):
        for projection in ("gate_proj", "up_proj"):
            base = f"model.layers.0.mlp.experts.{expert}.{projection}."
            tensors[base + "weight"] = torch.ones(ROWS, COLS).to(torch.float8_e4m3fn)
            tensors[base + scale_names[expert % len(scale_names)]] = torch.ones(1, 2)
            if activation:
                tensors[base + "activation_scale"] = torch.ones(())
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text("{}")
    return directory


def _pairs() -> list[tuple[str, tuple]]:
    boxes = stacked_boxes((EXPERTS, 2 * ROWS, COLS), 2)
    return [
        (f"model.layers.0.mlp.experts.{expert}.{projection}.weight", box)
        for expert, row in enumerate(boxes)
        for projection, box in zip(("gate_proj", "up_proj"), row, strict=True)
    ]


@pytest.mark.parametrize(
    ("scale_names", "activation"),
    [(("weight_scale_inv",), False), (("weight_scale",), True), (("qscale_weight",), False)],
)
def test_assembled_pieces_equal_the_pieces_asked_one_by_one(
    tmp_path: Path, scale_names: tuple[str, ...], activation: bool
) -> None:
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with Checkpoint.open(_write(tmp_path, scale_names=scale_names, activation=activation)) as checkpoint:
        bulk, single = fp8_adapter_for(_Config(), checkpoint), fp8_adapter_for(_Config(), checkpoint)
        made = bulk.assembled(name, _pairs())
        expected = TensorSource.assembled(single.piece(key, box, name=name) for key, box in _pairs())
        assert made == expected
        assert all(piece.scale_key == piece.key[: -len("weight")] + scale_names[0] for piece in made.pieces)
        assert bulk.describe() == single.describe()


def test_assembled_pieces_with_two_scale_spellings_take_the_piece_path(tmp_path: Path) -> None:
    name = "model.layers.0.mlp.experts.gate_up_proj"
    checkpoint = Checkpoint.open(_write(tmp_path, scale_names=("weight_scale_inv", "weight_scale")))
    with checkpoint:
        made = fp8_adapter_for(_Config(), checkpoint).assembled(name, _pairs())
        single = fp8_adapter_for(_Config(), checkpoint)
        assert made == TensorSource.assembled(single.piece(key, box, name=name) for key, box in _pairs())
        assert {piece.scale_key.rsplit(".", 1)[1] for piece in made.pieces} == {
            "weight_scale_inv",
            "weight_scale",
        }


def test_an_fp8_piece_without_its_scale_is_refused_naming_its_key(tmp_path: Path) -> None:
    _write(tmp_path, scale_names=("weight_scale_inv",))
    shard = tmp_path / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with Checkpoint.open(tmp_path) as checkpoint, pytest.raises(ScaleError) as raised:
        fp8_adapter_for(_Config(), checkpoint).assembled("model.layers.0.mlp.experts.gate_up_proj", _pairs())
    assert raised.value.key == "model.layers.0.mlp.experts.1.up_proj.weight"


def _reference_lists(keys: list[str]) -> dict[str, set[int]]:
    """Module by module: every segment of ASCII digits (past the first) indexes the list its prefix names."""
    lists: dict[str, set[int]] = {}
    for module in {key.rpartition(".")[0] for key in keys}:
        pattern: list[str] = []
        for i, part in enumerate(module.split(".")):
            digit = part.isascii() and part.isdigit()
            if digit and i:
                lists.setdefault(".".join(pattern), set()).add(int(part))
            pattern.append("*" if digit else part)
    return lists


@pytest.mark.parametrize(
    "keys",
    [
        [f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight" for layer in range(12) for e in range(11)],
        ["a.0.b.weight", "0.x.1.y", "x.1.2.3.w", "m.fc1.3.w", "m.\u00b2.w", "m.00.w", "layers.7", "a..1.b"],
        ["a.1a.2.w", "q.12.r.3.s.w", "q.12.r.4.s.w", "q.5.r.3.s.w", "w", "blocks.9.linear_fc1.weight"],
        ["a.\0.1.w", "a.2.w"],  # the mask character itself in a key
        ["a.1.w", "a.2\n.b.3.w"],  # a newline in a key
    ],
)
def test_layer_lists_equal_a_module_by_module_split(keys: list[str]) -> None:
    assert layer_lists(keys) == _reference_lists(keys)
