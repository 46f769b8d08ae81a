"""Text-only Ministral 3 (``model_type: ministral3``, ``Ministral3ForCausalLM``: Devstral 2 123B's class).

Its FP8 release is per-tensor FP8 with static activation scales, keys under the module tree's names
(``model.layers.*``, ``lm_head.weight``). References: stock transformers' own FP8 loader reading the same
directory, ``F.cross_entropy`` with autograd for the fused loss, the source's bytes for the save round trip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_plugins_mistral3_fp8 import plugin
from mistral3_checkpoints import PLUGIN, checkpoint_tensors, edit_tensors
from transformers import Ministral3ForCausalLM

import automodel_plugins
from automodel_plugins import Claim, Decline, save_pretrained
from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec
from automodel_plugins.errors import CheckpointError
from automodel_plugins.model.stock import build_on_meta
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.registry import Registry
from automodel_plugins.sources import load_config
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_matches_stock, load_stock
from automodel_plugins.testing.tiny_models import (
    MINISTRAL3_TEXT_ROPE_PARAMETERS,
    text_batch,
    tiny_ministral3_config,
)

DEVSTRAL_NOT_CONVERTED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
"""The ``modules_to_not_convert`` transformers' Ministral 3 conversion writes, text-only models included."""
DEVSTRAL_QUANTIZATION = {
    "activation_scheme": "static",
    "modules_to_not_convert": list(DEVSTRAL_NOT_CONVERTED),
    "quant_method": "fp8",
    "weight_block_size": None,
}
DEVSTRAL_2_123B_SIZES = {
    "hidden_size": 12288,
    "intermediate_size": 28672,
    "num_hidden_layers": 88,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
}
"""Devstral 2 123B (``mistralai/Devstral-2-123B-Instruct-2512``): SIZES FROM PUBLIC DESCRIPTIONS, CONFIG NOT
FETCHED. A 123B dense Mistral-Large-2-shaped model (hidden 12288, intermediate 28672, 88 layers, 96 heads, 8 KV
heads of 128) with the tekken vocabulary (131072, the Ministral3Config default) and the text-only conversion's
YaRN rotary; the published config.json could not be read here. Replace these with its numbers once fetched."""
TEXT_LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def devstral_model(*, tie: bool = False, seed: int = 0, **sizes: Any) -> Ministral3ForCausalLM:
    torch.manual_seed(seed)
    model = Ministral3ForCausalLM(tiny_ministral3_config(tie_word_embeddings=tie, **sizes)).eval()
    with torch.no_grad():  # norms start at exactly 1: perturb them so that a misplaced tensor would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


FORMATS = {
    # name: (tied embeddings, scale dtype, activation scale name, shards)
    "per-tensor-static": (False, torch.float32, "activation_scale", 1),
    "per-tensor-static-bf16-scales-sharded": (False, torch.bfloat16, "activation_scale", 3),
    "per-tensor-tied": (True, torch.float32, "activation_scale", 1),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ministral3_text")
    out = {}
    for name, (tie, scale_dtype, activation, shards) in FORMATS.items():
        out[name] = write_fp8_checkpoint(
            devstral_model(tie=tie),
            root / name,
            scale_dtype=scale_dtype,
            activation_scale_name=activation,
            modules_to_not_convert=DEVSTRAL_NOT_CONVERTED,
            shards=shards,
            quantization_extra={"activation_scheme": "static", "dequantize": None},
        )
    return out


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ministral3_bf16")
    devstral_model().to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


# --- the claim ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [None, DEVSTRAL_QUANTIZATION], ids=["unquantized", "fp8"])
def test_text_only_ministral3_is_claimed(quantization: dict[str, Any] | None) -> None:
    config = tiny_ministral3_config()
    if quantization is not None:
        config.quantization_config = dict(quantization)
    claim = plugin.claim_config(config)
    assert isinstance(claim, Claim) and "ministral3 text model" in claim.reason
    assert ("per-tensor FP8" if quantization else "unquantized") in claim.reason


def test_other_quantization_of_ministral3_is_declined() -> None:
    config = tiny_ministral3_config()
    config.quantization_config = {"quant_method": "awq", "bits": 4}
    answer = plugin.claim_config(config)
    assert isinstance(answer, Decline) and "quant_method 'awq'" in answer.reason


def test_list_config_shows_the_claim(checkpoints: dict[str, Path], run_cli: Any) -> None:
    result = run_cli("list", "--config", str(checkpoints["per-tensor-static"]), "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["claimed_by"] == PLUGIN
    (ours,) = [c for c in listing["claims"] if c["plugin"] == PLUGIN]
    assert ours["claimed"] is True
    assert ours["reason"] == "ministral3 text model (Ministral3ForCausalLM), per-tensor FP8 weights"


# --- loads equal stock transformers' FP8 loader -------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_matches_stock_fp8_loader(name: str, checkpoints: dict[str, Path]) -> None:
    """State dict bit for bit, rotary buffers (the text-only YaRN scaling), logits; per-tensor FP8 is read
    exactly by stock, so the comparison is with stock itself."""
    path = checkpoints[name]
    config = load_config(path)
    comparison = assert_matches_stock(
        path, inputs=text_batch(config, labels=False), plugin=PLUGIN, expected="stock"
    )
    ours = comparison.ours
    assert type(ours) is Ministral3ForCausalLM
    layers = config.num_hidden_layers
    assert ours.automodel_composition.load.dequantized == TEXT_LINEARS_PER_LAYER * layers
    assert len(ours.automodel_composition.load.dropped_keys) == TEXT_LINEARS_PER_LAYER * layers
    assert ours.automodel_composition.adapter["layout"] == "runtime"
    assert ours.automodel_composition.adapter["granularity"] == "per-tensor"
    rotary = ours.model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(16.0) + 1)  # mscale_all_dim 0: text-only
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is config.tie_word_embeddings


def test_unquantized_checkpoint_matches_stock(unquantized: Path) -> None:
    config = load_config(unquantized)
    comparison = assert_matches_stock(
        unquantized, inputs=text_batch(config, labels=False), plugin=PLUGIN, expected="stock"
    )
    assert comparison.ours.automodel_composition.load.dequantized == 0


def test_vlm_keys_under_a_text_only_config_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    path = Path(shutil.copytree(checkpoints["per-tensor-static"], tmp_path / "renamed"))
    edit_tensors(path, lambda t: t.update({f"language_model.{k}": t.pop(k) for k in list(t)}))
    with pytest.raises(
        CheckpointError, match="text-only ministral3 model, but the checkpoint holds a Mistral3"
    ):
        automodel_plugins.from_pretrained(path)


# --- the meta path, the fused loss, FP8 residency -------------------------------------------------------------


def test_build_on_meta_then_load_weights_repairs_rotary(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["per-tensor-static"]
    model = automodel_plugins.build_model(path)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.fill_(1234.5)  # what to_empty may leave
    automodel_plugins.load_weights(model, path)
    stock = load_stock(path)
    batch = text_batch(stock.config, labels=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, stock(**batch).logits)
    assert torch.equal(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)


def test_fused_loss_and_gradients_equal_cross_entropy(checkpoints: dict[str, Path]) -> None:
    """The fused loss against ``F.cross_entropy`` of the stock logits, shifted by hand, with autograd."""
    path = checkpoints["per-tensor-static"]
    ours = automodel_plugins.from_pretrained(path, dtype=torch.float32, skip_logits=True)
    reference = load_stock(path, dtype=torch.float32)
    batch = text_batch(ours.config)
    batch["labels"][0, :5] = -100
    out = ours(**batch)
    assert out.logits is None
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    expected.backward()
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(
            ours.get_parameter(name).grad, reference.get_parameter(name).grad, rtol=1e-4, atol=1e-6
        )


def test_fp8_resident_load_keeps_every_projection_fp8(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["per-tensor-static"]
    resident = automodel_plugins.from_pretrained(path, dequantize=False)
    layers = load_config(path).num_hidden_layers
    assert len(resident.automodel_composition.fp8_resident) == TEXT_LINEARS_PER_LAYER * layers
    stock = load_stock(path)
    batch = text_batch(stock.config, labels=False)
    with torch.no_grad():
        assert torch.equal(resident(**batch).logits, stock(**batch).logits)


# --- inspect and save -----------------------------------------------------------------------------------------


def test_inspect_describes_the_load_without_reading_data(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["per-tensor-static"]
    described = describe_checkpoint(path)
    assert described["bytes_read"] == 0 and described["plugin"] == PLUGIN
    assert described["config"]["model_type"] == "ministral3"
    load = described["load"]
    layers = load_config(path).num_hidden_layers
    assert (load["layout"], load["granularity"]) == ("runtime", "per-tensor")
    assert (
        load["fp8_tensors"] == load["scale_keys"] == load["dropped_keys"] == TEXT_LINEARS_PER_LAYER * layers
    )
    assert load["forward_overridden"] is True


@pytest.mark.parametrize(
    "name", ["per-tensor-static", "per-tensor-static-bf16-scales-sharded", "per-tensor-tied"]
)
def test_save_in_the_source_format_is_byte_identical(
    name: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints[name]
    model = automodel_plugins.from_pretrained(source)
    report = save_pretrained(model, tmp_path / "out")
    saved, original = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(source)
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and saved[key].shape == tensor.shape, key
        assert torch.equal(saved[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            key
        )
    if FORMATS[name][3] == 1:  # one file each: the whole file, header included, is the source's
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
            source / "model.safetensors"
        ).read_bytes()
    layers = load_config(source).num_hidden_layers
    assert report.quantized == report.scales_kept == TEXT_LINEARS_PER_LAYER * layers
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((source / "config.json").read_text())["quantization_config"]
    )
    assert config["architectures"] == ["Ministral3ForCausalLM"]


# --- Devstral 2 123B at full size ------------------------------------------------------------------------------


def devstral_2_123b_config() -> Any:
    config = tiny_ministral3_config(**DEVSTRAL_2_123B_SIZES, rope_parameters=MINISTRAL3_TEXT_ROPE_PARAMETERS)
    config.quantization_config = dict(DEVSTRAL_QUANTIZATION)
    return config


def write_header_only_checkpoint(directory: Path, config: Any) -> int:
    """``config.json`` and a full-size safetensors file whose data is a hole (a sparse file): every header
    entry the FP8 release has (FP8 linears with 0-d fp32 weight and activation scales, BF16 elsewhere), no
    data. Returns the tensor bytes the header declares."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_on_meta(config, torch.bfloat16)
    specs = []
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and name.removesuffix(".weight").endswith("_proj"):
            specs.append(TensorSpec(name, torch.float8_e4m3fn, tuple(tensor.shape)))
            for scale in ("weight_scale_inv", "activation_scale"):
                specs.append(TensorSpec(name.removesuffix("weight") + scale, torch.float32, ()))
        else:
            specs.append(TensorSpec(name, torch.bfloat16, tuple(tensor.shape)))
    SafetensorsWriter.create(directory / "model.safetensors", FileLayout.plan(specs, {"format": "pt"})).close(
        sync=False
    )
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return sum(spec.nbytes for spec in specs)


def test_devstral_2_123b_config_builds_on_meta_at_full_size_and_is_claimed(registry: Registry) -> None:
    config = devstral_2_123b_config()
    assert isinstance(plugin.claim_config(config), Claim)
    model = automodel_plugins.build_model(config, registry=registry)
    assert model.automodel_composition.plugin == PLUGIN
    assert type(model) is Ministral3ForCausalLM and model.device.type == "meta"
    parameters = sum(p.numel() for p in model.parameters())
    assert 123e9 < parameters < 126e9  # 122.6B + the 131072-token embeddings and head
    assert len(model.model.layers) == 88
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (96 * 128, 12288)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 12288)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (12288, 28672)


def test_devstral_2_123b_inspect_and_list_show_the_claim(tmp_path: Path, run_cli: Any) -> None:
    """``list --config`` on its config.json and ``inspect`` on a full-size header-only checkpoint."""
    config = devstral_2_123b_config()
    declared = write_header_only_checkpoint(tmp_path / "devstral", config)
    listing = run_cli("list", "--config", str(tmp_path / "devstral" / "config.json"), "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["claimed_by"] == PLUGIN
    result = run_cli("inspect", str(tmp_path / "devstral"), "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["plugin"] == PLUGIN and described["bytes_read"] == 0
    assert described["checkpoint"]["tensor_bytes"] == declared
    load = described["load"]
    assert load["fp8_tensors"] == 88 * TEXT_LINEARS_PER_LAYER == load["dropped_keys"]
    parameters = sum(p.numel() for p in build_on_meta(config, torch.bfloat16).parameters())
    assert load["bytes_after_load"] == 2 * parameters  # BF16 once loaded: ~250 GB
    assert load["bytes_after_load_fp8_resident"] < 0.55 * load["bytes_after_load"]
