"""The way out: ``automodel_plugins.save_pretrained`` writes a loaded Mistral3 back in the format it came in, in
transformers' FP8 format, or in BF16, and stock transformers reads each of them.

References: the source checkpoint's own bytes (round trips), stock transformers' loader and its
``save_pretrained`` (``quantization="none"``), and an FP8 block quantize -> dequantize written here.
"""

from __future__ import annotations

import json
import math
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
    image_inputs,
    legacy_name,
    stock_load,
    tiny_model,
)

from automodel_plugins import from_pretrained, save_pretrained
from automodel_plugins.registry import Registry

BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
TEXT_LINEARS = 14


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    different = [key for key in expected if not same_bytes(got[key], expected[key])]
    assert not different, different


def quantization_config(path: Path) -> dict | None:
    return json.loads((path / "config.json").read_text()).get("quantization_config")


# --- round trips: every format the loader reads ------------------------------------------------------------

ROUND_TRIPS = {
    "per-tensor-legacy-static": CheckpointSpec(),
    "per-tensor-bf16-scale": CheckpointSpec(scale_dtype=BF16),
    "per-tensor-runtime-tied": CheckpointSpec(model=ModelSpec(tie=True), layout="runtime"),
    "per-tensor-dynamic-sharded": CheckpointSpec(activation_scale_name=None, shards=2),
    "block-fp32-partial-edges": CheckpointSpec(model=ODD, block_size=(16, 16)),
    "block-bf16-partial-edges-runtime": CheckpointSpec(
        model=ODD, block_size=(32, 32), scale_dtype=BF16, layout="runtime"
    ),
    "block-tied": CheckpointSpec(model=ModelSpec(tie=True), block_size=(32, 32)),
    "compressed-tensors-names": CheckpointSpec(
        scale_name="weight_scale", activation_scale_name="input_scale"
    ),
    "mistral-native-names": CheckpointSpec(scale_name="qscale_weight", activation_scale_name="qscale_act"),
    "bf16-unquantized": CheckpointSpec(quantized=False),
}


@pytest.mark.parametrize("spec", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_source_round_trip_is_byte_identical(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, tmp_path: Path
) -> None:
    """Load, save as the source: every tensor, scale and activation scale is the source's, byte for byte,
    under the same keys, and the quantization_config is the source's."""
    source = checkpoints(spec)
    model = from_pretrained(source, registry=registry)
    report = save_pretrained(model, tmp_path / "out")
    assert_same_tensors(checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(source))
    assert quantization_config(tmp_path / "out") == quantization_config(source)
    quantized = TEXT_LINEARS if spec.quantized else 0
    assert (report.quantized, report.scales_kept, report.scales_fresh) == (quantized, quantized, 0)
    carried = quantized if spec.activation_scale_name else 0
    assert report.carried == carried
    assert report.path == (tmp_path / "out").resolve() and "config.json" in report.files
    assert report.bytes == sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert report.bytes_written_by_rank == [report.bytes_written]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is spec.model.tie


def test_the_saved_source_loads_like_the_source(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    source = checkpoints(block_size=(16, 16))
    model = from_pretrained(source, registry=registry)
    save_pretrained(model, tmp_path / "out")
    assert_same_weights(stock_load(tmp_path / "out"), stock_load(source))
    again = from_pretrained(tmp_path / "out", registry=registry)
    assert_same_weights(again, model)
    assert again.automodel_composition.adapter == model.automodel_composition.adapter


# --- after training --------------------------------------------------------------------------------------


def fp8_step(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One E4M3 quantization step at each value: ``scale * ulp(|v| / scale)`` (3 mantissa bits, subnormal
    step ``2**-9`` below ``2**-6``)."""
    x = (values.float() / scale).abs()
    exponent = torch.floor(torch.log2(x.clamp(min=2.0**-6)))
    return scale * torch.exp2(exponent - 3)


def expand(scale: torch.Tensor, shape: tuple[int, ...], block: list[int] | None) -> torch.Tensor:
    if block is None:
        return scale.float().reshape(())
    rows, cols = shape
    return scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def block_amax(weight: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """``max |w|`` of the whole tensor (0-d), or of each block (the scale grid's shape)."""
    if block is None:
        return weight.float().abs().max()
    rows, cols = weight.shape
    grid = torch.zeros(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            part = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            grid[i, j] = part.float().abs().max()
    return grid


FIT_LIMIT = FP8_MAX + 16.0
"""The largest ``|w| / scale`` E4M3 stores without clipping past its own rounding: 448 plus half its ulp (32)."""


def reference_scale(weight: torch.Tensor, source: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """docs/saving.md's policy, written out: per tensor or per block, the source scale while ``amax / scale``
    fits, else ``amax / 448`` (1 for an all-zero block), in the source's (fp32) dtype and shape."""
    amax = block_amax(weight, block).reshape(source.shape)
    fresh = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return torch.where(amax / source.float() <= FIT_LIMIT, source.float(), fresh).to(source.dtype)


FROZEN = "model.language_model.layers.1.self_attn.q_proj.weight"
GROWN = "model.language_model.layers.0.mlp.up_proj.weight"


def train_one_step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One large SGD step on the image batch with one projection frozen, then one projection tripled (its amax
    far past its source scale); the state dict after it."""
    model.get_parameter(FROZEN).requires_grad_(False)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    batch = image_inputs(BF16)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.get_parameter(GROWN).mul_(3.0)
    model.eval()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def loss(model: torch.nn.Module) -> float:
    batch = image_inputs(BF16)
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"]).loss.item()


@pytest.mark.parametrize(
    "spec",
    [CheckpointSpec(), CheckpointSpec(block_size=(16, 16))],
    ids=["per-tensor", "block-16"],
)
def test_after_a_training_step_stock_reads_the_trained_weights_within_one_fp8_step(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, tmp_path: Path
) -> None:
    """Train one step with our model, save, read back with stock transformers. Two references, neither ours:

    - the FP8 codes and scales: docs/saving.md's scale policy and ``clamp(w / s).to(e4m3) * s``, written out
      here, applied to the weights the model holds: stock's read must equal them bit for bit;
    - the trained weights: stock transformers' own training step on the same checkpoint and batch (its loss on
      BF16 logits upcast to fp32). Each FP8 weight stock reads is within one FP8 step of that block's scale of
      stock's trained weight: half a step of round-to-nearest, the other half for the two steps' bf16 rounding
      (their updates agree with cosine > 0.999, the fused loss's gradient bar).

    No bound on the loss of the FP8 copy against the BF16 one: FP8 rounding moves this tiny model's loss by what
    its curvature makes of half-step errors (measured 3.5% per tensor, 5.2% with 16x16 blocks, within 1% / 30%
    of the first-order ``grad . delta``), a property of the model, not of the save. The loss checked is that of
    the saved checkpoint through our load and forward against stock's, within the fused loss's 1e-3."""
    source = checkpoints(spec)
    original = checkpoint_tensors(source)
    model = from_pretrained(source, registry=registry)
    loaded = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trained = train_one_step(model)
    expected = train_one_step(stock_load(source))

    report = save_pretrained(model, tmp_path / "out")
    assert report.quantized == TEXT_LINEARS and report.scales_fresh >= 1 and report.scales_kept >= 1
    saved = checkpoint_tensors(tmp_path / "out")
    frozen_key = "language_model.model.layers.1.self_attn.q_proj"
    for suffix in ("weight", "weight_scale_inv"):
        assert same_bytes(saved[f"{frozen_key}.{suffix}"], original[f"{frozen_key}.{suffix}"]), suffix
    grown_scale = saved["language_model.model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert not same_bytes(grown_scale, original["language_model.model.layers.0.mlp.up_proj.weight_scale_inv"])
    assert (saved["language_model.model.layers.0.mlp.up_proj.weight"].float().abs().max() == FP8_MAX).item()

    stock = stock_load(tmp_path / "out")
    ours = from_pretrained(tmp_path / "out", registry=registry)
    assert_same_weights(ours, stock)
    block = quantization_config(tmp_path / "out")["weight_block_size"]
    state = stock.state_dict()
    for name, value in trained.items():
        if name != FROZEN:
            update, stock_update = (
                value.float() - loaded[name].float(),
                expected[name].float() - loaded[name].float(),
            )
            if stock_update.any():
                assert cosine(update, stock_update) > 0.999, name
        key = legacy_name(name)
        if saved[key].dtype != E4M3:
            assert torch.equal(state[name], value), name
            continue
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        assert same_bytes(saved[scale_key], reference_scale(value, original[scale_key], block)), scale_key
        scale = expand(saved[scale_key], tuple(value.shape), block)
        requantized = (value.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).float() * scale
        assert torch.equal(state[name], requantized.to(BF16)), name
        error = (state[name].float() - expected[name].float()).abs()
        assert (error <= fp8_step(expected[name], scale)).all(), name
    assert abs(loss(ours) - loss(stock)) <= 1e-3 * loss(stock)


# --- FP8 from a BF16 model --------------------------------------------------------------------------------


def reference_fp8_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantize -> dequantize, written out here: per block ``amax / 448`` (1 for an all-zero block),
    ``clamp(w / s)`` to E4M3, then ``q * s`` in fp32 rounded once to BF16."""
    rows, cols = weight.shape
    grid = torch.ones(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    out = torch.empty(rows, cols, dtype=BF16)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            part = weight[sl].float()
            amax = part.abs().max()
            if amax > 0:
                grid[i, j] = amax / FP8_MAX
            q = (part / grid[i, j]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
            out[sl] = (q.float() * grid[i, j]).to(BF16)
    return out, grid


def bf16_model(spec: ModelSpec | None = None) -> torch.nn.Module:
    return tiny_model(spec or ModelSpec()).to(BF16)


def test_fp8_block_from_a_bf16_model_is_what_stock_transformers_dequantizes(tmp_path: Path) -> None:
    """A model never loaded from a checkpoint, saved as 16x16 block FP8 (sizes the blocks divide, which stock
    transformers reads exactly): stock's load equals the reference, weight by weight."""
    model = bf16_model()
    report = save_pretrained(model, tmp_path / "out", quantization="fp8-block", block_size=16)
    config = quantization_config(tmp_path / "out")
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [16, 16]
    assert config["activation_scheme"] == "dynamic" and config["modules_to_not_convert"] == ["lm_head"]
    saved = checkpoint_tensors(tmp_path / "out")
    stock = stock_load(tmp_path / "out")
    state = stock.state_dict()
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    assert report.quantized == len(linears) > TEXT_LINEARS  # the vision tower and projector too
    for module in linears:
        weight = model.get_parameter(f"{module}.weight").detach()
        expected, grid = reference_fp8_block(weight, (16, 16))
        key = legacy_name(f"{module}.weight").removesuffix(".weight")
        assert saved[f"{key}.weight"].dtype == E4M3
        assert torch.equal(saved[f"{key}.weight_scale_inv"], grid), module
        assert torch.equal(state[f"{module}.weight"], expected), module
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_fp8_block_with_partial_edge_blocks_reads_back_as_the_reference(
    registry: Registry, tmp_path: Path
) -> None:
    model = bf16_model(ODD)
    with pytest.warns(UserWarning, match="partial"):
        save_pretrained(model, tmp_path / "out", quantization="fp8-block", block_size=(32, 32))
    ours = from_pretrained(tmp_path / "out", registry=registry)
    name = "model.language_model.layers.0.mlp.down_proj.weight"  # 72 x 136: partial on both axes
    expected, _ = reference_fp8_block(model.get_parameter(name).detach(), (32, 32))
    assert torch.equal(ours.get_parameter(name), expected)


def test_fp8_tensor_from_a_bf16_model(tmp_path: Path) -> None:
    model = bf16_model()
    save_pretrained(model, tmp_path / "out", quantization="fp8-tensor")
    assert quantization_config(tmp_path / "out")["weight_block_size"] is None
    saved = checkpoint_tensors(tmp_path / "out")
    scale = saved["language_model.model.layers.0.self_attn.o_proj.weight_scale_inv"]
    weight = model.get_parameter("model.language_model.layers.0.self_attn.o_proj.weight")
    assert scale.shape == () and scale.item() == weight.float().abs().max().item() / FP8_MAX
    state = stock_load(tmp_path / "out").state_dict()
    expected = ((weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).float() * scale).to(BF16)
    assert torch.equal(state["model.language_model.layers.0.self_attn.o_proj.weight"], expected)


def test_fp8_formats_keep_the_source_scales_where_the_granularity_matches(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    source = checkpoints(block_size=(16, 16), activation_scale_name=None)
    model = from_pretrained(source, registry=registry)
    report = save_pretrained(model, tmp_path / "block", quantization="fp8-block", block_size=16)
    assert report.scales_kept == TEXT_LINEARS
    saved, original = checkpoint_tensors(tmp_path / "block"), checkpoint_tensors(source)
    assert all(same_bytes(saved[k], original[k]) for k in original if original[k].dtype == E4M3)
    assert quantization_config(tmp_path / "block")["modules_to_not_convert"] == list(
        CheckpointSpec().modules_to_not_convert
    )
    report = save_pretrained(model, tmp_path / "tensor", quantization="fp8-tensor")
    assert report.scales_kept == 0 and report.scales_fresh == TEXT_LINEARS


# --- BF16: what stock save_pretrained writes -------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [None, 60_000])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_none_writes_what_stock_save_pretrained_writes(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path, max_shard_size: int | None, tie: bool
) -> None:
    model = from_pretrained(checkpoints(model=ModelSpec(tie=tie)), registry=registry)
    save_pretrained(model, tmp_path / "ours", quantization="none", max_shard_size=max_shard_size)
    model.save_pretrained(
        tmp_path / "stock", **({"max_shard_size": max_shard_size} if max_shard_size else {})
    )
    ours = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert ours == sorted(p.name for p in (tmp_path / "stock").iterdir())
    assert (len([n for n in ours if n.endswith(".safetensors")]) > 1) is (max_shard_size is not None)
    for name in ours:
        if name.endswith((".safetensors", ".index.json")):
            assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes(), name
        else:
            assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads(
                (tmp_path / "stock" / name).read_text()
            )


# --- PEFT: merge, then save in the source format ---------------------------------------------------------


def test_peft_merge_and_unload_then_save_the_source_format(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    source = checkpoints(block_size=(32, 32))
    model = from_pretrained(source, registry=registry)
    torch.manual_seed(1)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    from automodel_plugins.errors import SaveError

    with pytest.raises(SaveError, match="merge_and_unload"):
        save_pretrained(lora, tmp_path / "adapters")
    merged = lora.merge_and_unload()
    report = save_pretrained(merged, tmp_path / "out")
    assert report.quantized == TEXT_LINEARS
    saved, original = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(source)
    changed = {k for k in original if not same_bytes(saved[k], original[k])}
    assert changed and all(".q_proj." in k for k in changed)  # only the merged projections moved
    assert quantization_config(tmp_path / "out") == quantization_config(source)
    assert_same_weights(from_pretrained(tmp_path / "out", registry=registry), stock_load(tmp_path / "out"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "spec", [CheckpointSpec(), CheckpointSpec(model=ODD, block_size=(16, 16))], ids=["per-tensor", "block"]
)
def test_a_model_on_the_gpu_saves_the_files_the_cpu_one_does(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, tmp_path: Path
) -> None:
    source = checkpoints(spec)
    cpu = from_pretrained(source, registry=registry)
    gpu = from_pretrained(source, registry=registry, device="cuda")
    with torch.no_grad():  # one weight past its scale, so fresh scales are made on both devices
        for model in (cpu, gpu):
            model.model.language_model.layers[0].mlp.up_proj.weight.mul_(3.0)
    for quantization in ("source", "fp8-block", "none"):
        save_pretrained(cpu, tmp_path / f"cpu-{quantization}", quantization=quantization)
        save_pretrained(gpu, tmp_path / f"gpu-{quantization}", quantization=quantization)
        for file in (tmp_path / f"cpu-{quantization}").glob("*.safetensors"):
            assert (tmp_path / f"gpu-{quantization}" / file.name).read_bytes() == file.read_bytes(), (
                quantization
            )


def test_weights_loaded_without_a_config_beside_them_round_trip(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    """``load_weights`` from a bare weights file: the source's quantization is the one the model declared."""
    from automodel_plugins import build_model, load_config, load_weights

    source = checkpoints.copy(tmp_path / "source", block_size=(16, 16))
    declared = quantization_config(source)
    config = load_config(source)
    (source / "config.json").unlink()
    model = build_model(config, registry=registry)
    model.to_empty(device="cpu")
    load_weights(model, source / "model.safetensors", registry=registry)
    report = save_pretrained(model, tmp_path / "out")
    assert report.scales_kept == TEXT_LINEARS
    assert_same_tensors(checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(source))
    assert quantization_config(tmp_path / "out") == declared


def test_the_composition_records_the_source(registry: Registry, checkpoints: Checkpoints) -> None:
    source = checkpoints(block_size=(16, 16), shards=2)
    model = from_pretrained(source, registry=registry)
    record = model.automodel_composition.source
    assert record.directory == source.resolve() and record.config_file == source.resolve() / "config.json"
    assert record.quantization_config == quantization_config(source)
    assert record.adapter["layout"] == "legacy" and record.adapter["granularity"] == "block 16x16"
    assert {stamp.path.name for stamp in record.files} == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert record.changed_files() == [] and not record.stage


def test_a_save_with_the_progress_bar_on(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    model = from_pretrained(checkpoints(), registry=registry)
    report = save_pretrained(model, tmp_path / "out", progress=True)
    assert report.quantized == TEXT_LINEARS
