"""Mistral-native compressed-tensors FP8_BLOCK (Mistral Large 3's form) end to end, on tiny generated checkpoints.

Large 3's layout, small: ``params.json`` with a compressed-tensors ``quantization_config`` (one FP8_BLOCK group,
Large 3's ignore list as published), ``consolidated.safetensors`` with native names, per-expert
``experts.E.w1/w2/w3`` and block scales under either spelling (llm-compressor's ``weight_scale``, BF16; Mistral's
``qscale_weight``, fp32). Sizes give partial edge blocks (hidden 72 with 16x16 blocks: every matrix's last
column block, the experts' ``down`` rows) and a BF16 ``kv_a_proj_with_mqa`` of 40 rows (not a multiple of the
block, as Large 3's 576 is not of 128). The quantization (amax per block: ``tests/mistral_native_checkpoints.py``)
and the reference dequantization (codes times their block's scale in fp32, cast once; experts stacked by hand:
here) are the tests' own; the reference model is stock ``Mistral3ForConditionalGeneration`` (``mistral4`` text)
holding those weights.

The dense form (``ministral3`` text, q/k rows in Mistral's rotary order) checks FP8 residency of rotary-order
rows: kept FP8 when the permutation stays within rows of scale blocks, dequantized with the reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral_native_checkpoints import (
    LARGE_3_IGNORE,
    MLA_TO_NATIVE,
    compressed_tensors,
    expand,
    native_key,
    native_tensors,
    params_of,
    quantize,
    tiny_mla_model,
    write_large3_like,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch, tiny_mistral3_config

BF16 = torch.bfloat16
BLOCK = 16


def dequantize(codes: torch.Tensor, grid: torch.Tensor, block: int) -> torch.Tensor:
    return codes.float() * expand(grid.float(), codes.shape, block)


def stored(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "consolidated.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def raw(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


def large3_reference(
    model: Mistral3ForConditionalGeneration, directory: Path
) -> Mistral3ForConditionalGeneration:
    """Stock class, normal init, holding the file's values: FP8 dequantized here, experts stacked by hand
    (``gate_up[e] = cat(w1, w3)``, ``down[e] = w2``), BF16 tensors as stored, vision q/k from the model."""
    file = stored(directory)
    text = model.config.text_config

    def value(key: str) -> torch.Tensor:
        for scale in ("weight_scale", "qscale_weight"):
            if key.removesuffix("weight") + scale in file:
                return dequantize(file[key], file[key.removesuffix("weight") + scale], BLOCK)
        return file[key].float()

    inverse = {native: hf for hf, native in MLA_TO_NATIVE.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." in name:
            n = name.split(".")[3]
            experts = range(text.n_routed_experts)
            if name.endswith("gate_up_proj"):
                state[name] = torch.stack(
                    [
                        torch.cat([value(f"layers.{n}.experts.{e}.{w}.weight") for w in ("w1", "w3")])
                        for e in experts
                    ]
                )
            else:
                state[name] = torch.stack([value(f"layers.{n}.experts.{e}.w2.weight") for e in experts])
        elif name.startswith("model.language_model.layers."):
            n, rest = name.split(".", 4)[3:]
            module = rest.removesuffix(".weight")
            native = next(k for k, v in inverse.items() if v == module)
            state[name] = value(f"layers.{n}.{native}.weight")
        elif name.startswith("model.vision_tower") and name.endswith(("q_proj.weight", "k_proj.weight")):
            state[name] = tensor.to(BF16)  # BF16 on disk in rotary order: the model's own rows, rounded
        else:
            state[name] = value(native_key(name))
        assert state[name].shape == tensor.shape, name
    expected = Mistral3ForConditionalGeneration._from_config(model.config, dtype=BF16).eval()
    expected.load_state_dict({k: v.to(BF16) for k, v in state.items()}, strict=True)
    expected.set_experts_implementation("eager")
    return expected


@pytest.fixture(scope="module")
def large3_like(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = tiny_mla_model(hidden_size=72, moe_intermediate_size=32)
    root = tmp_path_factory.mktemp("native-fp8-block")
    paths = {name: write_large3_like(model, root / name, name) for name in ("weight_scale", "qscale_weight")}
    return {"model": model, "paths": paths, "reference": large3_reference(model, paths["weight_scale"])}


def batches(config: Any) -> list[dict[str, torch.Tensor]]:
    image = mistral3_image_batch(config, batch=2, seq=16, image_hw=(32, 32), labels=False, dtype=BF16)
    return [text_batch(config.text_config, batch=2, seq=12, labels=False), image]


def eager(model: Any) -> Any:
    model.set_experts_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("scale_name", ["weight_scale", "qscale_weight"])
def test_large3_form_loads_bit_identical_to_the_reference(
    large3_like: dict[str, Any], scale_name: str
) -> None:
    path = large3_like["paths"][scale_name]
    expected = large3_like["reference"]
    if scale_name == "qscale_weight":  # fp32 scales: their own reference
        expected = large3_reference(large3_like["model"], path)
    ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16))
    assert ours.automodel_composition.adapter["granularity"] == f"block {BLOCK}x{BLOCK}"
    assert ours.automodel_composition.adapter["scale_names"] == [scale_name]
    # MLA rows are a pure rename (transformers' Mistral4 converter): the stock attention reads them interleaved
    assert ours.config.text_config.rope_interleave is True
    attention = ours.model.language_model.layers[0].self_attn
    assert attention.kv_a_proj_with_mqa.weight.shape[0] % BLOCK  # a BF16 width that is not a block multiple
    assert_same_state_dict(ours, expected)
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)


@pytest.mark.parametrize("scale_name", ["weight_scale", "qscale_weight"])
def test_large3_form_dequantize_false_keeps_experts_and_linears_fp8(
    large3_like: dict[str, Any], scale_name: str, tmp_path: Path
) -> None:
    """The experts become ``Fp8Experts`` (codes and block grids as stored, per expert), the quantized linears
    ``Fp8Linear``, the ignored ones stay BF16 ``nn.Linear``; logits equal the reference (FP8-resident layers
    dequantize exactly as the load does); a source save gives the files back byte for byte."""
    path = large3_like["paths"][scale_name]
    expected = large3_like["reference"]
    if scale_name == "qscale_weight":
        expected = large3_reference(large3_like["model"], path)
    ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False))
    assert ours.automodel_composition.fp8_not_resident == []
    text = ours.model.language_model
    for layer in (1, 2):
        experts = text.layers[layer].mlp.experts
        assert isinstance(experts, Fp8Experts) and experts.gate_up_proj.dtype == torch.uint8
        assert isinstance(text.layers[layer].mlp.shared_experts.down_proj, Fp8Linear)
    attention = text.layers[0].self_attn
    for name in ("q_b_proj", "kv_b_proj", "o_proj"):
        assert isinstance(getattr(attention, name), Fp8Linear), name
    for name in ("q_a_proj", "kv_a_proj_with_mqa"):
        assert (
            type(getattr(attention, name)) is torch.nn.Linear
            and getattr(attention, name).weight.dtype == BF16
        )
    file = stored(path)
    codes = text.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(codes[2, :32], file["layers.1.experts.2.w1.weight"].view(torch.uint8))
    assert torch.equal(codes[2, 32:], file["layers.1.experts.2.w3.weight"].view(torch.uint8))
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)
    automodel_plugins.save_pretrained(ours, tmp_path / "out")
    assert raw(stored(tmp_path / "out")) == raw(file)


# --- the dense form: FP8 q/k rows in Mistral's rotary order ------------------------------------------------------


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' ``permute_for_rope``: Mistral's interleaved rows -> transformers' half-split rows."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_dense_block(model: Mistral3ForConditionalGeneration, directory: Path, block: int) -> Path:
    directory.mkdir()
    tensors = native_tensors(model)
    for key in list(tensors):
        module = key.removesuffix(".weight").rpartition(".")[2]
        if key.startswith("layers.") and module in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            tensors[key], tensors[key.removesuffix("weight") + "weight_scale"] = quantize(
                tensors[key], block, BF16
            )
    params = params_of(model.config)
    params["quantization_config"] = compressed_tensors(
        block,
        [
            "model.embed_tokens",
            "re:vision_encoder.*",
            "re:patch_merger.*",
            "re:vision_language_adapter.*",
            "lm_head",
        ],
    )
    (directory / "params.json").write_text(json.dumps(params))
    save_file(tensors, directory / "consolidated.safetensors")
    return directory


def dense_reference(model: Mistral3ForConditionalGeneration, directory: Path, block: int) -> Any:
    """The file's FP8 text linears dequantized here in stored (rotary) order, then q/k rows permuted as
    transformers' converter does; everything else the model's own."""
    file, text = stored(directory), model.config.text_config
    state = {}
    for name, tensor in model.state_dict().items():
        key = native_key(name)
        scale = key.removesuffix("weight") + "weight_scale"
        value = dequantize(file[key], file[scale], block) if scale in file else tensor
        if scale in file and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = text.num_attention_heads if "q_proj" in name else text.num_key_value_heads
            value = permute_for_rope(value, heads)
        state[name] = value.to(torch.float32)
    expected = Mistral3ForConditionalGeneration(model.config).eval()
    expected.load_state_dict(state, strict=True)
    return expected


@pytest.fixture(scope="module")
def dense_model() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(tiny_mistral3_config(vision={"hidden_act": "silu"})).eval()


def test_rotary_order_q_k_stay_fp8_when_heads_fit_the_scale_blocks(
    dense_model: Mistral3ForConditionalGeneration, tmp_path: Path
) -> None:
    """16-row blocks, 16-row heads: a head's rows are permuted within its row of blocks, so q/k keep FP8 codes
    (permuted) and their grids as stored; logits as the reference's; a source save is the source."""
    path = write_dense_block(dense_model, tmp_path / "b16", 16)
    expected = dense_reference(dense_model, path, 16)
    ours = automodel_plugins.from_pretrained(path, dtype=torch.float32, dequantize=False)
    attention = ours.model.language_model.layers[1].self_attn
    assert isinstance(attention.q_proj, Fp8Linear) and isinstance(attention.k_proj, Fp8Linear)
    assert ours.automodel_composition.fp8_not_resident == []
    heads = dense_model.config.text_config.num_attention_heads
    file = stored(path)
    assert torch.equal(
        attention.q_proj.weight.view(torch.uint8),
        permute_for_rope(file["layers.1.attention.wq.weight"].view(torch.uint8), heads),
    )
    assert torch.equal(attention.q_proj.weight_scale_inv, file["layers.1.attention.wq.weight_scale"].float())
    plain = automodel_plugins.from_pretrained(path, dtype=torch.float32)
    assert_same_state_dict(plain, expected)
    for inputs in (
        text_batch(expected.config.text_config, labels=False),
        mistral3_image_batch(expected.config, labels=False),
    ):
        assert_same_logits(ours, expected, inputs)
    automodel_plugins.save_pretrained(ours, tmp_path / "out")
    assert raw(stored(tmp_path / "out")) == raw(file)


def test_rotary_order_q_k_crossing_scale_blocks_are_dequantized_with_the_reason(
    dense_model: Mistral3ForConditionalGeneration, tmp_path: Path
) -> None:
    """8-row blocks, 16-row heads: permuting a head's rows moves codes between rows of blocks, so no grid fits
    the permuted codes; q/k are dequantized at load (named in the warning), the rest stays FP8, logits exact."""
    path = write_dense_block(dense_model, tmp_path / "b8", 8)
    expected = dense_reference(dense_model, path, 8)
    with pytest.warns(UserWarning, match=r"4 FP8 tensor\(s\) cannot stay FP8 .*cross its 8-row scale blocks"):
        ours = automodel_plugins.from_pretrained(path, dtype=torch.float32, dequantize=False)
    attention = ours.model.language_model.layers[0].self_attn
    assert type(attention.q_proj) is torch.nn.Linear and isinstance(attention.v_proj, Fp8Linear)
    assert sorted(ours.automodel_composition.fp8_not_resident) == sorted(
        f"model.language_model.layers.{n}.self_attn.{p}_proj.weight" for n in (0, 1) for p in "qk"
    )
    assert_same_logits(ours, expected, text_batch(expected.config.text_config, labels=False))


LARGE_3_PARAMS = Path("/work/shared/reference/data/mistral-large-3-675b-instruct-2512.params.json")


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_the_tiny_form_declares_large3_quantization_as_published() -> None:
    """The tiny checkpoints' ``quantization_config`` is the real Large 3 one, field for field, but the block."""
    published = json.loads(LARGE_3_PARAMS.read_text())["quantization_config"]
    assert compressed_tensors(128, LARGE_3_IGNORE) == published
