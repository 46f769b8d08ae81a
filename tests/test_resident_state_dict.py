"""``load_state_dict`` on an FP8-resident model (issue 20, item 6): only FP8 codes load into FP8 codes.

A BF16 state dict loaded into ``Fp8Linear`` / ``Fp8Experts`` (``strict=False``, or BF16 weights beside the
model's own scales with ``strict=True``) used to be cast into the ``uint8`` codes without a word. It is refused
with a ``DtypeMismatchError`` naming the key, before anything of the model changes; the deliberate route,
``requantize_state_dict``, encodes the weights under the scale policy, checked here against the checkpoint's own
bytes and against a quantization written out below. The BF16 weights are
``reference_dequantized_state_dict`` (the checkpoint dequantized independently of the host).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_checkpoints import registry, write_llama
from safetensors import safe_open

import automodel_plugins
from automodel_plugins.errors import DtypeMismatchError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import reference_dequantized_state_dict

F32, BF16, E4M3 = torch.float32, torch.bfloat16, torch.float8_e4m3fn
LAYER = "model.layers.1.mlp.down_proj"
"""An FP8-resident layer of the tiny Llama: 64 x 200, partial 32 x 8 edge blocks in the block checkpoint."""


@pytest.fixture(scope="module", params=[None, (32, 32)], ids=["per-tensor", "block"])
def llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama") / "ckpt", block_size=request.param)


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Path]:
    """Checkpoints of another seed (other codes and scales), to load a state dict into."""
    root = tmp_path_factory.mktemp("other")
    return {block: write_llama(root / str(block), seed=1, block_size=block) for block in (None, (32, 32))}


def resident(path: Path, dtype: torch.dtype = F32) -> Any:
    return automodel_plugins.from_pretrained(path, dequantize=False, dtype=dtype, registry=registry())


def block_of(path: Path) -> tuple[int, int] | None:
    return resident(path).get_submodule(LAYER).block_size


def logits(model: Any) -> torch.Tensor:
    ids = torch.arange(2 * 11).reshape(2, 11) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor as bytes, so that FP8 and float values compare exactly."""
    return {k: v.detach().reshape(-1).clone().view(torch.uint8) for k, v in model.state_dict().items()}


def assert_unchanged(model: Any, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert list(after) == list(before)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


# --- what keeps working ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes_as", ["fp8", "uint8"])
def test_state_dict_round_trip_gives_identical_logits(
    llama: Path, other_llama: dict[Any, Path], codes_as: str
) -> None:
    """``state_dict()`` of one resident model into another of other weights: the same codes, scales, logits."""
    source = resident(llama)
    state = source.state_dict()
    if codes_as == "uint8":
        state = {k: v.view(torch.uint8) if v.dtype == E4M3 else v for k, v in state.items()}
    target = resident(other_llama[source.get_submodule(LAYER).block_size])
    assert not torch.equal(logits(target), logits(source))
    result = target.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(target), logits(source))
    assert all(isinstance(m, Fp8Linear) for n, m in target.named_modules() if n.endswith("proj"))
    assert_unchanged(target, snapshot(source))  # every code, scale and float tensor, byte for byte


# --- what is refused -------------------------------------------------------------------------------------------


def test_a_bf16_state_dict_with_strict_false_is_refused_and_nothing_changes(llama: Path) -> None:
    model = resident(llama, BF16)
    before = snapshot(model)
    bf16 = reference_dequantized_state_dict(llama, dtype=BF16)  # weights only: no scale keys
    bf16["model.embed_tokens.weight"] += 1.0  # met before any resident layer: must not be loaded either
    with pytest.raises(DtypeMismatchError) as info:
        model.load_state_dict(bf16, strict=False)
    message = str(info.value)
    assert info.value.key == "model.layers.0.self_attn.q_proj.weight"  # the first resident layer
    assert "torch.bfloat16" in message and "dequantize=True" in message
    assert "requantize_state_dict" in message
    assert_unchanged(model, before)  # embeddings and norms, met before the first layer, too


def test_bf16_weights_beside_the_models_own_scales_with_strict_true_are_refused(llama: Path) -> None:
    model = resident(llama)
    before = snapshot(model)
    state = model.state_dict()
    bf16 = reference_dequantized_state_dict(llama, dtype=BF16)
    state[f"{LAYER}.weight"] = bf16[f"{LAYER}.weight"]  # one layer's weight, its scale the model's own
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] + 1.0
    with pytest.raises(DtypeMismatchError, match=rf"\[{LAYER}\.weight\].*dequantize=True"):
        model.load_state_dict(state, strict=True)
    assert_unchanged(model, before)


def test_codes_of_another_fp8_format_are_refused(llama: Path) -> None:
    model = resident(llama)
    state = model.state_dict()
    state[f"{LAYER}.weight"] = state[f"{LAYER}.weight"].float().to(torch.float8_e5m2)
    with pytest.raises(DtypeMismatchError, match=r"float8_e5m2 codes cannot be loaded.*float8_e4m3fn"):
        model.load_state_dict(state)


def test_a_layer_on_its_own_refuses_too() -> None:
    """An ``Fp8Linear`` built by hand (no model-level hook) refuses at its own load."""
    codes = torch.randn(8, 16).to(E4M3)
    layer = Fp8Linear.from_fp8(codes, torch.tensor(0.5), block_size=None, compute_dtype=F32)
    with pytest.raises(DtypeMismatchError, match=r"\[weight\]: a torch.float32 value"):
        layer.load_state_dict({"weight": torch.randn(8, 16), "weight_scale_inv": torch.tensor(0.5)})
    assert torch.equal(layer.weight.view(E4M3).float(), codes.float())


# --- the deliberate route: requantize_state_dict ----------------------------------------------------------------


def checkpoint_tensor(path: Path, key: str) -> torch.Tensor:
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return handle.get_tensor(key)
    raise KeyError(key)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_requantizing_the_dequantized_weights_gives_back_the_checkpoint(
    llama: Path, dtype: torch.dtype
) -> None:
    """Values that fit their scale keep it (the policy), so they encode to the checkpoint's own bytes."""
    model = resident(llama)
    expected = logits(model)
    state = reference_dequantized_state_dict(llama, dtype=dtype)
    requantized = automodel_plugins.requantize_state_dict(model, state)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8Linear):
            got = requantized[f"{name}.weight"]
            assert got.dtype == E4M3 and torch.equal(
                got.view(torch.uint8), checkpoint_tensor(llama, f"{name}.weight").view(torch.uint8)
            ), name
            assert torch.equal(
                requantized[f"{name}.weight_scale_inv"].float().reshape(-1),
                checkpoint_tensor(llama, f"{name}.weight_scale_inv").float().reshape(-1),
            ), name
    with torch.no_grad():  # scramble the model, then load the requantized weights back
        for layer in model.modules():
            if isinstance(layer, Fp8Linear):
                layer.weight.copy_(layer.weight.flip(0))
    assert not torch.equal(logits(model), expected)
    model.load_state_dict(requantized, strict=False)  # lm_head's and the norms' values in ``dtype``
    if dtype == F32:
        assert torch.equal(logits(model), expected)


def reference_quantize(
    values: torch.Tensor, source: torch.Tensor, block: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Written out independently of the host: per tensor or per block, keep the source scale while
    ``amax / scale <= 448 + 16 / 2`` (no value clipped beyond E4M3's rounding), else ``amax / 448``; codes are
    ``(v / scale)`` clamped to +-448 and rounded to E4M3."""
    values = values.float()
    rows, cols = values.shape
    block_rows, block_cols = block or (rows, cols)
    grid = source.float().reshape(math.ceil(rows / block_rows), math.ceil(cols / block_cols)).clone()
    codes = torch.empty(rows, cols, dtype=E4M3)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            cell = (slice(i * block_rows, (i + 1) * block_rows), slice(j * block_cols, (j + 1) * block_cols))
            amax = values[cell].abs().max().item()
            if amax / grid[i, j].item() > 448 + 8:
                grid[i, j] = amax / 448 if amax > 0 else 1.0
            codes[cell] = (values[cell] / grid[i, j]).clamp(-448, 448).to(E4M3)
    return codes, grid.reshape(source.shape)


def test_weights_grown_past_their_scale_get_fresh_scales_as_the_reference_quantizes(llama: Path) -> None:
    model = resident(llama)
    layer = model.get_submodule(LAYER)
    source = layer.weight_scale_inv.clone()
    weight = reference_dequantized_state_dict(llama, dtype=F32)[f"{LAYER}.weight"]
    weight[: weight.shape[0] // 2] *= 3.0  # the upper half (whole blocks, or the whole tensor) past its scale
    weight[-1, -1] = 0.25 * weight.abs().max()  # a partial edge block grows a little (a block checkpoint)
    requantized = automodel_plugins.requantize_state_dict(model, {f"{LAYER}.weight": weight})
    codes, scale = reference_quantize(weight, source, layer.block_size)
    assert torch.equal(requantized[f"{LAYER}.weight"].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(requantized[f"{LAYER}.weight_scale_inv"].float().reshape(scale.shape), scale)
    assert not torch.equal(scale, source.reshape(scale.shape))  # some scales are fresh
    model.load_state_dict(requantized, strict=False)
    expected = (codes.float() * _expand(scale, layer.block_size, weight.shape)).to(F32)
    assert torch.equal(layer.dequantized_weight(F32), expected)


def _expand(scale: torch.Tensor, block: tuple[int, int] | None, shape: torch.Size) -> torch.Tensor:
    if block is None:
        return scale.reshape(())
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def test_requantize_passes_codes_and_other_tensors_through(llama: Path) -> None:
    model = resident(llama)
    state = model.state_dict()
    requantized = automodel_plugins.requantize_state_dict(model, state)
    assert list(requantized) == list(state) and all(requantized[k] is state[k] for k in state)


# --- fused MoE experts ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distributed import _tiny

    return _tiny.write_moe_checkpoint(tmp_path_factory.mktemp("moe") / "ckpt", aligned=True)


def test_experts_refuse_bf16_and_requantize_back_to_their_codes(moe: Path, plugin_registry: Any) -> None:
    plugin_registry("qwen3_vl_moe_fp8")
    model = automodel_plugins.from_pretrained(moe, dequantize=False, dtype=F32)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Experts)}
    assert experts
    name, module = next(iter(experts.items()))
    before = snapshot(model)
    bf16 = {f"{n}.{p}": m.dequantized(p, BF16) for n, m in experts.items() for p in m.CODE_NAMES}
    with pytest.raises(DtypeMismatchError) as info:
        model.load_state_dict(bf16, strict=False)
    assert info.value.key == f"{name}.gate_up_proj" and "Fp8Experts" in str(info.value)
    assert_unchanged(model, before)

    requantized = automodel_plugins.requantize_state_dict(model, bf16)
    for key in bf16:
        held = getattr(model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2])
        assert torch.equal(requantized[key].view(torch.uint8), held), key
    grown = bf16[f"{name}.down_proj"].float()
    grown[1] *= 5.0  # expert 1 past its grids
    requantized = automodel_plugins.requantize_state_dict(model, {f"{name}.down_proj": grown})
    grids = module.down_proj_scale_inv.clone()
    for expert in range(grown.shape[0]):
        codes, scale = reference_quantize(grown[expert], grids[expert], module.block_size)
        assert torch.equal(
            requantized[f"{name}.down_proj"][expert].view(torch.uint8), codes.view(torch.uint8)
        )
        assert torch.equal(requantized[f"{name}.down_proj_scale_inv"][expert].float(), scale)
    model.load_state_dict(requantized, strict=False)
    assert torch.equal(module.down_proj_scale_inv[0], grids[0])  # kept: its values fit
    assert not torch.equal(module.down_proj_scale_inv[1], grids[1])  # fresh: grown past them
    assert torch.equal(module.down_proj_scale_inv, requantized[f"{name}.down_proj_scale_inv"].float())
