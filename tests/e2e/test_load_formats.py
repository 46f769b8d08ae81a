"""Every on-disk format loads into the stock class exactly as stock transformers loads it (or as an FP8
dequant computed here, independently of the host, where transformers does not read the format)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mistral3_checkpoints import (
    NOT_CONVERTED,
    ODD,
    PLUGIN,
    Checkpoints,
    CheckpointSpec,
    ModelSpec,
    assert_same_weights,
    checkpoint_tensors,
    edit_tensors,
    legacy_name,
    logits,
    stock_load,
)
from transformers import Mistral3ForConditionalGeneration

from automodel_plugins import CheckpointError, from_pretrained
from automodel_plugins.registry import Registry

TEXT_LINEARS = 7 * 2  # q, k, v, o, gate, up, down in each of the two layers


def load(path: Path, registry: Registry, **kwargs: object) -> Mistral3ForConditionalGeneration:
    return from_pretrained(path, registry=registry, **kwargs)


def reference_state_dict(
    path: Path, layout: str, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The checkpoint dequantized here: ``(w.float() * scale_expanded.float()).to(dtype)`` under runtime names."""
    tensors = checkpoint_tensors(path)
    block = json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"]
    out: dict[str, torch.Tensor] = {}
    for name in _model_names(path):
        key = legacy_name(name) if layout == "legacy" else name
        value = tensors[key]
        if value.dtype == torch.float8_e4m3fn:
            scale = tensors[key.removesuffix("weight") + "weight_scale_inv"].float()
            value = value.float() * _expand(scale, value.shape, block)
        out[name] = value.to(dtype)
    return out


def _model_names(path: Path) -> list[str]:
    config = Mistral3ForConditionalGeneration.config_class.from_pretrained(path)
    with torch.device("meta"):
        return list(Mistral3ForConditionalGeneration(config).state_dict())


def _expand(scale: torch.Tensor, shape: torch.Size, block: list[int] | None) -> torch.Tensor:
    """A 0-d scale as it is; a block grid repeated over its blocks and cropped to the weight (partial edges)."""
    if block is None:
        assert scale.dim() == 0
        return scale
    rows, cols = shape
    block_rows, block_cols = block
    assert scale.shape == (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    return scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def assert_equals_reference(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    different = [
        k for k in state if state[k].dtype != reference[k].dtype or not torch.equal(state[k], reference[k])
    ]
    assert not different, different


# --- per-tensor FP8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32-scale", "bf16-scale"])
def test_per_tensor_fp8_equals_stock(
    registry: Registry, checkpoints: Checkpoints, scale_dtype: torch.dtype
) -> None:
    path = checkpoints(scale_dtype=scale_dtype)
    model = load(path, registry)
    assert_same_weights(model, stock_load(path))
    assert_equals_reference(model, reference_state_dict(path, "legacy"))
    composition = model.automodel_composition
    assert composition.plugin == PLUGIN
    assert composition.adapter["granularity"] == "per-tensor"
    assert composition.load.dequantized == TEXT_LINEARS
    assert composition.dequantized_from == "fp8"


def test_activation_scales_are_dropped_and_accounted(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints()
    model = load(path, registry)
    activation_keys = sorted(k for k in checkpoint_tensors(path) if k.endswith(".activation_scale"))
    assert len(activation_keys) == TEXT_LINEARS
    assert sorted(model.automodel_composition.load.dropped_keys) == activation_keys
    assert not any("activation_scale" in name for name in model.state_dict())


# --- block FP8 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [(32, 32), (16, 16), (32, 16)])
def test_block_fp8_with_partial_edge_blocks(
    registry: Registry, checkpoints: Checkpoints, block_size: tuple[int, int]
) -> None:
    """Stock transformers 5.24 refuses grids with partial blocks ("not divisible by scale grid"): the
    reference is the dequant computed here."""
    path = checkpoints(model=ODD, block_size=block_size)
    tensors = checkpoint_tensors(path)
    down = tensors["language_model.model.layers.0.mlp.down_proj.weight"]
    grid = tensors["language_model.model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert down.shape == (72, 136) and grid.shape == (
        math.ceil(72 / block_size[0]),
        math.ceil(136 / block_size[1]),
    )
    assert 72 % block_size[0] or 136 % block_size[1]  # at least one axis has partial edge blocks
    model = load(path, registry)
    assert model.automodel_composition.adapter["granularity"] == f"block {block_size[0]}x{block_size[1]}"
    assert_equals_reference(model, reference_state_dict(path, "legacy"))


@pytest.mark.parametrize("block_size", [(32, 32), (16, 16)])
def test_block_fp8_equals_stock_where_stock_reads_it(
    registry: Registry, checkpoints: Checkpoints, block_size: tuple[int, int]
) -> None:
    path = checkpoints(block_size=block_size)
    model = load(path, registry)
    assert_same_weights(model, stock_load(path))
    assert_equals_reference(model, reference_state_dict(path, "legacy"))


def test_block_scales_are_applied_per_block(registry: Registry, checkpoints: Checkpoints) -> None:
    """Distinct scales per block (not one value broadcast): each block of the result is its own grid cell's."""
    path = checkpoints(model=ODD, block_size=(32, 32))
    key = "language_model.model.layers.1.mlp.up_proj.weight_scale_inv"
    grid = checkpoint_tensors(path)[key]
    assert grid.unique().numel() > 1
    model = load(path, registry)
    assert_equals_reference(model, reference_state_dict(path, "legacy"))


# --- scale names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale_name", "activation_name"), [("weight_scale", "input_scale"), ("qscale_weight", "qscale_act")]
)
def test_other_scale_names_equal_stock_of_weight_scale_inv(
    registry: Registry, checkpoints: Checkpoints, scale_name: str, activation_name: str
) -> None:
    """Stock transformers does not read these names: the reference is its load of the same weights written
    under ``weight_scale_inv`` (the FP8 data is the same bytes, only the names differ)."""
    path = checkpoints(scale_name=scale_name, activation_scale_name=activation_name)
    keys = checkpoint_tensors(path)
    assert any(k.endswith("." + scale_name) for k in keys) and not any(
        k.endswith("weight_scale_inv") for k in keys
    )
    model = load(path, registry)
    assert model.automodel_composition.adapter["scale_names"] == [scale_name]
    dropped = model.automodel_composition.load.dropped_keys
    assert len(dropped) == TEXT_LINEARS and all(k.endswith("." + activation_name) for k in dropped)
    assert_same_weights(model, stock_load(checkpoints()))


def test_scales_without_activation_scales(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints(activation_scale_name=None)
    model = load(path, registry)
    assert model.automodel_composition.load.dropped_keys == []
    assert_same_weights(model, stock_load(path))


# --- key layouts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_both_layouts_detected_from_keys_with_the_same_layer_count(
    registry: Registry, checkpoints: Checkpoints, layout: str
) -> None:
    path = checkpoints(layout=layout)
    keys = checkpoint_tensors(path)
    prefix = "language_model.model.layers." if layout == "legacy" else "model.language_model.layers."
    assert any(k.startswith(prefix) for k in keys)
    model = load(path, registry)
    assert model.automodel_composition.adapter["layout"] == layout
    assert_same_weights(model, stock_load(path))
    assert_same_weights(
        model, load(checkpoints(layout="legacy" if layout == "runtime" else "runtime"), registry)
    )


def test_mixed_layouts_are_refused(registry: Registry, checkpoints: Checkpoints, tmp_path: Path) -> None:
    path = checkpoints.copy(tmp_path / "mixed")
    legacy = "language_model.model.norm.weight"
    edit_tensors(path, lambda t: t.__setitem__("model.language_model.norm.weight", t.pop(legacy)))
    with pytest.raises(CheckpointError) as caught:
        load(path, registry)
    assert "mixes the legacy" in str(caught.value) and "model.language_model.norm.weight" in str(caught.value)


def test_fp8_tensor_in_a_listed_module_is_an_error_naming_the_key(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """The config says the projector is never FP8, the checkpoint has it in FP8: refuse, never guess."""
    path = checkpoints(fp8_modules_skipped=("model.vision_tower", "lm_head"))
    assert checkpoint_tensors(path)["multi_modal_projector.linear_1.weight"].dtype == torch.float8_e4m3fn
    with pytest.raises(CheckpointError, match="modules_to_not_convert") as caught:
        load(path, registry)
    key = caught.value.key
    assert key.startswith("multi_modal_projector.") and key in str(caught.value)
    assert checkpoint_tensors(path)[key].dtype == torch.float8_e4m3fn


def test_modules_to_not_convert_may_leave_other_modules_fp8(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """A config listing only ``lm_head``: the FP8 projector and vision tower are dequantized like stock does."""
    path = checkpoints(modules_to_not_convert=("lm_head",))
    tensors = checkpoint_tensors(path)
    assert tensors["vision_tower.transformer.layers.0.attention.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["language_model.lm_head.weight"].dtype == torch.bfloat16
    model = load(path, registry)
    assert model.automodel_composition.load.dequantized > TEXT_LINEARS
    assert_same_weights(model, stock_load(path))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_lm_head(registry: Registry, checkpoints: Checkpoints, tie: bool) -> None:
    path = checkpoints(model=ModelSpec(tie=tie))
    assert ("language_model.lm_head.weight" in checkpoint_tensors(path)) is not tie
    model = load(path, registry)
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) is tie
    assert_same_weights(model, stock_load(path))


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_and_single_file(registry: Registry, checkpoints: Checkpoints, shards: int) -> None:
    path = checkpoints(shards=shards)
    assert (path / "model.safetensors.index.json").is_file() is (shards > 1)
    assert len(list(path.glob("*.safetensors"))) == shards
    model = load(path, registry)
    assert_same_weights(model, stock_load(path))
    assert_same_weights(model, load(checkpoints(shards=4 - shards), registry))


# --- dequant target dtype ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [CheckpointSpec(), CheckpointSpec(block_size=(32, 32)), CheckpointSpec(model=ODD, block_size=(32, 32))],
    ids=["per-tensor", "block", "partial-block"],
)
def test_float32_target(registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec) -> None:
    path = checkpoints(spec)
    model = load(path, registry, dtype=torch.float32)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert_equals_reference(model, reference_state_dict(path, "legacy", torch.float32))
    if spec.model != ODD:  # stock refuses partial blocks
        assert_same_weights(model, stock_load(path, dtype=torch.float32))


def test_default_target_is_bfloat16(registry: Registry, checkpoints: Checkpoints) -> None:
    model = load(checkpoints(), registry)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16


# --- logits with an image ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        CheckpointSpec(),
        CheckpointSpec(model=ModelSpec(tie=True), layout="runtime", shards=2),
        CheckpointSpec(block_size=(32, 32)),
        CheckpointSpec(quantized=False),
    ],
    ids=["per-tensor", "tied-runtime-sharded", "block", "bf16"],
)
def test_logits_with_an_image_equal_stock(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec
) -> None:
    """Bit-identical (``torch.equal``) bf16 logits: same weights, same stock modules, same inputs."""
    path = checkpoints(spec)
    ours, stock = logits(load(path, registry)), logits(stock_load(path))
    assert ours.dtype == stock.dtype == torch.bfloat16
    assert ours.shape == (1, 16, 256)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, stock)


def test_partial_block_logits_equal_stock_model_holding_the_reference(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """The stock model (loaded by stock transformers from a BF16 checkpoint) given the reference weights."""
    path = checkpoints(model=ODD, block_size=(32, 32))
    stock = stock_load(checkpoints(model=ODD, quantized=False))
    stock.load_state_dict(reference_state_dict(path, "legacy"))
    assert torch.equal(logits(load(path, registry)), logits(stock))


def test_float32_logits_with_an_image_equal_stock(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints()
    ours = logits(load(path, registry, dtype=torch.float32), torch.float32)
    stock = logits(stock_load(path, dtype=torch.float32), torch.float32)
    assert ours.dtype == torch.float32 and torch.equal(ours, stock)


# --- unquantized ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
def test_unquantized_bf16_checkpoint_is_claimed_and_equals_stock(
    registry: Registry, checkpoints: Checkpoints, layout: str
) -> None:
    path = checkpoints(quantized=False, layout=layout)
    model = load(path, registry)
    composition = model.automodel_composition
    assert composition.plugin == PLUGIN and composition.dequantized_from is None
    assert composition.load.dequantized == 0
    assert_same_weights(model, stock_load(path))


def test_save_pretrained_output_of_stock_loads_identically(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    """What ``save_pretrained`` writes (legacy keys, its own config) is claimed and loads as stock loads it."""
    source = stock_load(checkpoints(quantized=False))
    source.save_pretrained(tmp_path)
    model = load(tmp_path, registry)
    assert model.automodel_composition.plugin == PLUGIN
    assert_same_weights(model, stock_load(tmp_path))


# --- zero copy --------------------------------------------------------------------------------------------


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data, or None for anonymous memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_bf16_tensors_are_used_in_place(registry: Registry, checkpoints: Checkpoints) -> None:
    """Every BF16 tensor of the checkpoint is memory-mapped from its shard; only FP8 ones are new memory."""
    path = checkpoints(shards=2)
    stored = checkpoint_tensors(path)
    bf16_keys = [k for k, t in stored.items() if t.dtype == torch.bfloat16]
    model = load(path, registry)
    report = model.automodel_composition.load
    assert report.used_in_place == len(bf16_keys) and report.converted == 0
    shard_files = {str(p.resolve()) for p in path.glob("*.safetensors")}
    for name, tensor in model.named_parameters():
        fp8 = stored[legacy_name(name)].dtype == torch.float8_e4m3fn
        assert (_mapped_file(tensor) in shard_files) is not fp8, name


def test_float32_target_converts_instead(registry: Registry, checkpoints: Checkpoints) -> None:
    report = load(checkpoints(), registry, dtype=torch.float32).automodel_composition.load
    assert report.used_in_place == 0 and report.converted == report.tensors - TEXT_LINEARS


def test_not_converted_modules_are_the_bf16_ones(checkpoints: Checkpoints) -> None:
    """The generated checkpoint matches the real format: FP8 exactly in the text stack's Linear weights."""
    fp8 = {k for k, t in checkpoint_tensors(checkpoints()).items() if t.dtype == torch.float8_e4m3fn}
    assert len(fp8) == TEXT_LINEARS
    assert all(k.startswith("language_model.model.layers.") for k in fp8)
    assert not any(k.startswith(legacy_name(m + ".")) for k in fp8 for m in NOT_CONVERTED)
