"""The many-to-one adapter contract through the host alone: a model tensor assembled from several checkpoint
tensors (each with its own FP8 scale) or from a transposed one, planned, streamed (only the parts a region
overlaps), described and saved back; and the box geometry beneath it.

The layout is made up for the test, on a tiny Llama: each ``mlp.gate_proj.weight [72, 32]`` stored as two row
pieces ``gate_proj.top.weight [40, 32]`` and ``gate_proj.bottom.weight [32, 32]``, 16x16-block FP8 with partial
edge blocks (40 = 2 * 16 + 8); each ``self_attn.o_proj.weight`` stored transposed, BF16. The expected values
are computed here from the written tensors (``w.float() * expanded scale``, ``torch.cat``, ``.T``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import automodel_plugins
from automodel_plugins import Claim, Piece, StateDictAdapter, TensorSource, hookimpl, stacked_boxes
from automodel_plugins.adapters import PieceGeometry, fp8_adapter_for
from automodel_plugins.adapters.pieces import boxes_tile, intersect
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import MissingKeysError, ShapeMismatchError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.encode import quantize
from automodel_plugins.fp8.stacked import stacked_dequantize, stacked_encode
from automodel_plugins.pipeline.readers import read_assembled
from automodel_plugins.registry import Registry
from automodel_plugins.testing.tiny_models import tiny_llama_config

BLOCK = (16, 16)
TOP = 40


class PiecedAdapter(StateDictAdapter):
    """gate_proj from its two row pieces, o_proj from its transpose, everything else one to one."""

    def __init__(self, checkpoint: Checkpoint, config: Any, boxes: dict[str, Any] | None = None) -> None:
        self.inner = fp8_adapter_for(config, checkpoint)
        self.boxes = boxes or {"top": ((0, TOP), (0, 32)), "bottom": ((TOP, 72), (0, 32))}

    def from_hf(self, name: str) -> TensorSource:
        if name.endswith("mlp.gate_proj.weight"):
            base = name.removesuffix(".weight")
            return self.inner.assembled(
                name, [(f"{base}.{part}.weight", box) for part, box in self.boxes.items()]
            )
        if name.endswith("self_attn.o_proj.weight"):
            return self.inner.assembled(name, [(name + "_t", None)], transposed=True)
        return self.inner.from_hf(name)

    def to_hf(self, name: str) -> str:
        return self.inner.to_hf(name)


class PiecedPlugin:
    def __init__(self, **adapter_options: Any) -> None:
        self.options = adapter_options

    @hookimpl
    def claim_config(self, config: Any) -> Claim | None:
        return Claim(reason="a pieced llama") if config.model_type == "llama" else None

    @hookimpl
    def state_dict_adapter(self, config: Any, checkpoint: Any) -> Any:
        return PiecedAdapter(checkpoint, config, **self.options)

    @hookimpl
    def post_materialize(self, model: Any, config: Any) -> None:
        from automodel_plugins import repair_rotary

        repair_rotary(model)


def registry_of(plugin: Any) -> Registry:
    registry = Registry()
    assert registry.register(plugin, name="pieced").status == "loaded"
    return registry


def stored(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def write_pieced(model: torch.nn.Module, directory: Path) -> Path:
    """The made-up layout: FP8 (16x16 blocks, fp32 scales) for every Linear but o_proj and lm_head."""
    directory.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().float()
        if name.endswith("mlp.gate_proj.weight"):
            base = name.removesuffix(".weight")
            for part, rows in (("top", value[:TOP]), ("bottom", value[TOP:])):
                tensors[f"{base}.{part}.weight"], tensors[f"{base}.{part}.weight_scale_inv"] = quantize(
                    rows.contiguous(), block_size=BLOCK
                )
        elif name.endswith("self_attn.o_proj.weight"):
            tensors[name + "_t"] = value.T.contiguous().to(torch.bfloat16)
        elif name.endswith("_proj.weight"):
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantize(
                value, block_size=BLOCK
            )
        else:
            tensors[name] = value.to(torch.bfloat16)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["lm_head"],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def expected_state(directory: Path) -> dict[str, torch.Tensor]:
    tensors = stored(directory)

    def dequant(key: str) -> torch.Tensor:
        weight, scale = tensors[key], tensors[key.removesuffix("weight") + "weight_scale_inv"]
        rows, cols = weight.shape
        grid = scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
        return (weight.float() * grid).to(torch.bfloat16)

    out = {}
    for key, tensor in tensors.items():
        if key.endswith("scale_inv"):
            continue
        if key.endswith(".top.weight"):
            base = key.removesuffix(".top.weight")
            out[base + ".weight"] = torch.cat([dequant(key), dequant(base + ".bottom.weight")])
        elif key.endswith(".bottom.weight"):
            continue
        elif key.endswith("_t"):
            out[key.removesuffix("_t")] = tensor.T
        elif tensor.dtype == torch.float8_e4m3fn:
            out[key] = dequant(key)
        else:
            out[key] = tensor
    return out


@pytest.fixture(scope="module")
def pieced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=72)).eval()
    return write_pieced(model, tmp_path_factory.mktemp("pieced") / "ckpt")


# --- loading ----------------------------------------------------------------------------------------------


def test_assembled_tensors_load_as_their_pieces_say(pieced: Path) -> None:
    model = automodel_plugins.from_pretrained(pieced, registry=registry_of(PiecedPlugin()))
    expected = expected_state(pieced)
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    load = model.automodel_composition.load
    assert load.assembled == 2 * 2 and load.pieces == 2 * 3  # per layer: gate (2 pieces), o_proj (1)


def test_materialized_model_is_filled_in_place(pieced: Path) -> None:
    registry = registry_of(PiecedPlugin())
    model = automodel_plugins.build_model(pieced, registry=registry)
    model.to_empty(device="cpu")
    gate = model.model.layers[0].mlp.gate_proj.weight
    before = gate.data_ptr()
    automodel_plugins.load_weights(model, pieced, registry=registry)
    assert gate.data_ptr() == before and model.model.layers[0].mlp.gate_proj.weight is gate
    assert torch.equal(gate, expected_state(pieced)["model.layers.0.mlp.gate_proj.weight"])


def test_a_region_reads_only_the_overlapping_rows_of_each_piece(pieced: Path) -> None:
    """Rows 30..50 of gate_proj: rows 30..40 of the top piece, 0..10 of the bottom one, and both scale grids."""
    config = automodel_plugins.load_config(pieced)
    name = "model.layers.1.mlp.gate_proj.weight"
    with Checkpoint.open(pieced) as checkpoint:
        source = PiecedAdapter(checkpoint, config).from_hf(name)
        value, read = read_assembled(
            checkpoint,
            source,
            shape=(72, 32),
            dtype=torch.bfloat16,
            device=torch.device("cpu"),
            region=(slice(30, 50), slice(0, 32)),
        )
        assert read == 2
        assert checkpoint.bytes_read == 20 * 32 + 4 * (3 * 2 + 2 * 2)  # FP8 rows + fp32 grids 3x2 and 2x2
    assert torch.equal(value, expected_state(pieced)[name][30:50])


def test_inspect_counts_assembled_tensors_and_pieces(pieced: Path) -> None:
    described = automodel_plugins.describe_checkpoint(pieced, registry=registry_of(PiecedPlugin()))
    load = described["load"]
    assert described["bytes_read"] == 0
    assert (load["assembled_tensors"], load["pieces"]) == (4, 6)
    assert load["scale_keys"] == 2 * (2 + 5)  # gate pieces, and q/k/v/up/down


def test_save_splits_the_tensors_back_into_their_pieces(pieced: Path, tmp_path: Path) -> None:
    registry = registry_of(PiecedPlugin())
    model = automodel_plugins.from_pretrained(pieced, registry=registry)
    automodel_plugins.save_pretrained(model, tmp_path / "out", registry=registry)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        pieced / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("boxes", "problem"),
    [
        ({"top": ((0, TOP), (0, 32)), "bottom": ((TOP - 8, 64), (0, 32))}, "do not cover it exactly once"),
        ({"top": ((0, TOP), (0, 32)), "bottom": ((TOP, 80), (0, 32))}, "cannot fill the box"),
        ({"top": ((0, 32), (0, 32)), "bottom": ((TOP, 72), (0, 32))}, "cannot fill the box"),
    ],
    ids=["overlap", "outside", "wrong-shape"],
)
def test_pieces_that_do_not_tile_the_tensor_are_refused(pieced: Path, boxes: dict, problem: str) -> None:
    with pytest.raises(ShapeMismatchError, match=problem):
        automodel_plugins.describe_checkpoint(pieced, registry=registry_of(PiecedPlugin(boxes=boxes)))


def test_a_missing_piece_is_a_missing_key(pieced: Path, tmp_path: Path) -> None:
    boxes = {"top": ((0, TOP), (0, 32)), "middle": ((TOP, 72), (0, 32))}
    with pytest.raises(MissingKeysError, match=r"gate_proj\.middle\.weight"):
        automodel_plugins.describe_checkpoint(pieced, registry=registry_of(PiecedPlugin(boxes=boxes)))


# --- the contract and the geometry ------------------------------------------------------------------------


def test_a_one_to_one_source_is_one_piece_covering_the_tensor() -> None:
    source = TensorSource("w", scale_key="w_scale", block_size=(8, 8), dropped_keys=("w_act",))
    (piece,) = source.parts()
    assert piece == Piece("w", None, "w_scale", (8, 8), False, ("w_act",))
    assert piece.box_in((3, 5)) == ((0, 3), (0, 5)) and not source.is_assembled
    assembled = TensorSource.assembled(
        [Piece("a", ((0, 1),), dropped_keys=("x",)), Piece("b", ((1, 2),), "b_s")]
    )
    assert assembled.key == "a" and assembled.dropped_keys == ("x",) and assembled.is_fp8
    assert assembled.keys == ("a", "x", "b", "b_s") and assembled.data_keys == ("a", "b")
    with pytest.raises(ValueError, match="no scale of its own"):
        TensorSource("a", scale_key="s", pieces=(Piece("a"),))
    with pytest.raises(ValueError, match="at least one piece"):
        TensorSource.assembled([])


def test_geometry_of_a_squeezed_transposed_piece_round_trips() -> None:
    """Expert 2's ``[H, I]`` matrix stored transposed inside a ``[E, I, H]`` tensor."""
    geometry = PieceGeometry(((2, 3), (0, 6), (0, 4)), stored_ndim=2, transposed=True)
    assert geometry.squeezed == 1 and geometry.stored_shape == (4, 6) and not geometry.keeps_rows
    overlap = ((2, 3), (1, 5), (0, 4))
    assert geometry.stored_region(overlap) == ((0, 4), (1, 5))
    full = torch.arange(5 * 6 * 4).reshape(5, 6, 4)
    stored_part = full[2].T[0:4, 1:5]
    assert torch.equal(geometry.to_model(stored_part, overlap), full[2:3, 1:5, :])
    assert torch.equal(geometry.to_stored(full[2:3, 1:5, :]), stored_part)
    assert PieceGeometry(((0, 2), (0, 3)), stored_ndim=1).stored_shape is None  # a left-out dim of 2


def test_stacked_boxes_and_tiling() -> None:
    boxes = stacked_boxes((3, 8, 5), 2)
    assert boxes[1] == [((1, 2), (0, 4), (0, 5)), ((1, 2), (4, 8), (0, 5))]
    flat = [box for row in boxes for box in row]
    assert boxes_tile((3, 8, 5), flat) and not boxes_tile((3, 8, 5), flat[:-1])
    assert not boxes_tile((3, 8, 5), [*flat[:-1], flat[0]])
    many = [((i, i + 1), (0, 5)) for i in range(100)]
    assert boxes_tile((100, 5), many) and not boxes_tile((100, 5), [*many[:-1], ((98, 100), (0, 5))])
    assert intersect(((0, 4), (0, 5)), ((4, 8), (0, 5))) is None
    with pytest.raises(ValueError, match="equal parts"):
        stacked_boxes((3, 7, 5), 2)


def test_stacked_block_fp8_is_the_2d_path_on_every_matrix() -> None:
    torch.manual_seed(0)
    values = torch.randn(3, 40, 24)
    parts = [quantize(matrix, block_size=BLOCK) for matrix in values]
    weight, scale = torch.stack([w for w, _ in parts]), torch.stack([s for _, s in parts])
    whole = stacked_dequantize(weight, scale, dtype=torch.bfloat16, block_size=BLOCK)
    for index in range(3):
        assert torch.equal(
            whole[index], dequantize(weight[index], scale[index], dtype=torch.bfloat16, block_size=BLOCK)
        )
    region = (slice(1, 3), slice(10, 35), slice(5, 24))
    part = stacked_dequantize(weight[region], scale, dtype=torch.bfloat16, block_size=BLOCK, region=region)
    assert torch.equal(part, whole[region])
    encoded = stacked_encode(
        values[1:3, 10:35, 5:24], scale, fp8_dtype=torch.float8_e4m3fn, block_size=BLOCK, origin=(1, 10, 5)
    )
    assert torch.equal(encoded.view(torch.uint8), weight[region].view(torch.uint8))
    assert math.prod(scale.shape) == 3 * 3 * 2
