"""Re-quantizing saves (``quantization="fp8-tensor"`` / ``"fp8-block"``, ``convert --to``) of compressed-tensors
checkpoints keep the source's choice of what stays unquantized.

llm-compressor's ``ignore`` list (``re:`` patterns over module names) says which linears it kept BF16: Large 3's
``kv_a_proj_with_mqa`` / ``q_a_proj`` / router / vision, a Mistral 4 fine-tune's vision tower and projector.
The output is transformers' ``fp8`` format (``weight_scale_inv``, as each ``--to`` documents); a module the
source stored BF16 is written BF16 (bit-identical), every other linear FP8, and the output's
``modules_to_not_convert`` says exactly that, as stock transformers matches it. Stock transformers loads the
output to the loaded model's values within one FP8 step.

Sources: the HF form (``tests/mistral4_checkpoints.py`` rewritten as compressed-tensors, with Large 3's
``re:.*kv_a_proj_with_mqa$`` / ``re:.*q_a_proj$`` entries and those modules BF16) and the Mistral-native form
(Large 3's published ignore list, ``tests/mistral_native_checkpoints.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import legacy_key, stored_tensors, tiny_model, write_checkpoint
from mistral_native_checkpoints import tiny_mla_model, write_large3_like
from safetensors.torch import save_file
from test_compressed_tensors_hf import as_compressed_tensors
from transformers.quantizers.quantizers_utils import should_convert_module

import automodel_plugins
from automodel_plugins.model.hf_layout import linear_weights
from automodel_plugins.testing.compare import load_stock, reference_dequantized_state_dict

BF16 = torch.bfloat16
FP8_STEP = 2.0**-3
"""E4M3's relative spacing (3 mantissa bits): two roundings of one value differ by at most one step."""
KEPT_BF16 = ("q_a_proj", "kv_a_proj_with_mqa")


def source_bf16(module: str) -> bool:
    """What both sources store unquantized: vision tower, projector, head (ignored by name or ``re:``), and
    the MLA down-projections (``re:.*q_a_proj$``, ``re:.*kv_a_proj_with_mqa$``)."""
    return module.startswith(
        ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    ) or module.endswith(KEPT_BF16)


def with_bf16_down_projections(path: Path, original: Path) -> Path:
    """The HF compressed-tensors checkpoint with ``q_a_proj`` / ``kv_a_proj_with_mqa`` stored BF16 (their
    values dequantized from ``original``, the same codes and scales) and ignored as Large 3's list spells it."""
    tensors = stored_tensors(path)
    dequantized = reference_dequantized_state_dict(original)
    for key in list(tensors):
        if key.endswith(tuple(f"{leaf}.weight" for leaf in KEPT_BF16)):
            tensors[key] = dequantized[key]
            del tensors[key.removesuffix("weight") + "weight_scale"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] += [f"re:.*{leaf}$" for leaf in KEPT_BF16]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_hf_source(root: Path) -> Path:
    """The HF source under ``root``: Mistral 4 (MLA, per-expert experts) in compressed-tensors FP8_BLOCK 16x16
    with Large 3's BF16 down-projections; returns its directory (``root / "hf-ct"``)."""
    original = write_checkpoint(tiny_model(), root / "fg", "block-per-expert", block=(16, 16))
    return with_bf16_down_projections(as_compressed_tensors(original, root / "hf-ct"), original)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct-save")
    hf = write_hf_source(root)
    native = write_large3_like(
        tiny_mla_model(hidden_size=72, moe_intermediate_size=32), root / "native", "weight_scale"
    )
    return {"hf": hf, "native": native}


@pytest.fixture(autouse=True)
def only_mistral3(plugin_registry: Any) -> None:
    plugin_registry("mistral3_fp8")


def fp8_modules(directory: Path) -> set[str]:
    """The modules the saved files hold FP8 (each has a ``weight_scale_inv``), in the files' key naming."""
    return {
        k.removesuffix(".weight_scale_inv")
        for k in stored_tensors(directory)
        if k.endswith("weight_scale_inv")
    }


def assert_faithful(model: Any, out: Path, block: list[int] | None) -> None:
    section = json.loads((out / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "fp8" and section["weight_block_size"] == block
    skip = section["modules_to_not_convert"]
    stored = stored_tensors(out)
    on_disk = fp8_modules(out)
    stock = load_stock(out)
    stock_state, ours = stock.state_dict(), model.state_dict()
    for weight, module in linear_weights(model).items():
        # the source's choice kept; the config says it as stock transformers matches it
        assert (legacy_key(weight).removesuffix(".weight") in on_disk) == (not source_bf16(module)), module
        assert should_convert_module(module, skip) == (not source_bf16(module)), (module, skip)
        got, want = stock_state[weight].float(), ours[weight].float()
        if source_bf16(module):
            assert stored[legacy_key(weight)].dtype == BF16 and torch.equal(got, want), weight
        else:
            assert stored[legacy_key(weight)].dtype == torch.float8_e4m3fn, weight
            assert torch.all((got - want).abs() <= want.abs() * FP8_STEP + want.abs().amax() * 2.0**-9), (
                weight
            )


@pytest.mark.parametrize("source", ["hf", "native"])
@pytest.mark.parametrize(("quantization", "block"), [("fp8-block", [8, 8]), ("fp8-tensor", None)])
def test_requantizing_save_keeps_the_source_unquantized_modules(
    sources: dict[str, Path], tmp_path: Path, source: str, quantization: str, block: list[int] | None
) -> None:
    model = automodel_plugins.from_pretrained(sources[source], dtype=BF16)
    out = tmp_path / "out"
    automodel_plugins.save_pretrained(model, out, quantization=quantization, block_size=block)
    assert_faithful(model, out, block)


@pytest.mark.parametrize("source", ["hf", "native"])
def test_convert_to_fp8_block_keeps_the_source_unquantized_modules(
    sources: dict[str, Path], tmp_path: Path, run_cli: Any, source: str
) -> None:
    out = tmp_path / "out"
    done = run_cli("convert", str(sources[source]), str(out), "--to", "fp8-block", "--block", "8")
    assert done.returncode == 0, done.stderr
    assert_faithful(automodel_plugins.from_pretrained(sources[source], dtype=BF16), out, [8, 8])


def test_the_written_list_is_short(sources: dict[str, Path], tmp_path: Path) -> None:
    """Whole subtrees by their root, a module every layer keeps by its name within the layer (transformers
    matches entries as suffixes): Large 3's list stays a handful of entries at any depth."""
    for source in ("native", "hf"):
        model = automodel_plugins.from_pretrained(sources[source], dtype=BF16)
        out = tmp_path / source
        automodel_plugins.save_pretrained(model, out, quantization="fp8-tensor")
        section = json.loads((out / "config.json").read_text())["quantization_config"]
        assert set(section["modules_to_not_convert"]) >= {
            "self_attn.kv_a_proj_with_mqa",
            "self_attn.q_a_proj",
        }
        assert len(section["modules_to_not_convert"]) <= 8, section


def test_without_the_source_re_patterns_cannot_be_resolved(sources: dict[str, Path], tmp_path: Path) -> None:
    """The ``re:`` entries are resolved against the source's tensor dtypes: with the source gone, the save asks
    for the list instead of quantizing what the source kept BF16 (the caller's list is then used as given)."""
    import shutil

    from automodel_plugins.errors import SaveError

    copy = shutil.copytree(sources["hf"], tmp_path / "src")
    model = automodel_plugins.from_pretrained(copy, dtype=BF16)
    (copy / "model.safetensors").unlink()
    with pytest.raises(SaveError, match=r"re: patterns.*modules_to_not_convert"):
        automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="fp8-tensor")
    assert not (tmp_path / "out").exists()
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head", "q_a_proj", "kv_a_proj_with_mqa"]
    automodel_plugins.save_pretrained(
        model, tmp_path / "out", quantization="fp8-tensor", modules_to_not_convert=skip
    )
    assert_faithful(model, tmp_path / "out", None)
