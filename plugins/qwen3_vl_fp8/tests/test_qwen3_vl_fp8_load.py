"""Loading block-FP8 Qwen3-VL checkpoints through the plugin, checked with the author's kit against stock
transformers (where it reads the format exactly) or the independent reference dequantization (where it does not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

import automodel_plugins
from automodel_plugins.errors import CheckpointError, ConfigMismatchError
from automodel_plugins.testing.compare import (
    assert_matches_stock,
    assert_same_logits,
    load_stock,
    reference_model,
    stock_reads_exactly,
)

PLUGIN = "qwen3_vl_fp8"
DISTRIBUTION = "automodel-plugins-qwen3-vl-fp8"
QWEN_FP8 = {
    "activation_scale_name": None,
    "quantization_extra": {"activation_scheme": "dynamic", "fmt": "e4m3"},
}
"""What Qwen ships: dynamic activations (no activation scales on disk), e4m3."""
TEXT_ONLY_FP8 = ("model.visual", "lm_head")
VISION_FP8 = ("model.visual.merger", "model.visual.deepstack_merger_list", "lm_head")
"""Vision blocks quantized too: qkv (96x32), proj, fc1 (64x32), fc2 (32x64) get several 32x32 blocks."""

FORMATS = {
    # name: (block size, scale dtype, modules_to_not_convert, shards, compared against)
    "128-fp32-scales": ((128, 128), torch.float32, TEXT_ONLY_FP8, 1, "reference"),
    "128-bf16-scales": ((128, 128), torch.bfloat16, TEXT_ONLY_FP8, 1, "reference"),
    "32-fp32-scales-vision-fp8": ((32, 32), torch.float32, VISION_FP8, 1, "reference"),
    "32-bf16-scales-3-shards": ((32, 32), torch.bfloat16, TEXT_ONLY_FP8, 3, "reference"),
    "8-whole-blocks-fp32": ((8, 8), torch.float32, VISION_FP8, 1, "stock"),
    "8-whole-blocks-bf16": ((8, 8), torch.bfloat16, TEXT_ONLY_FP8, 1, "stock"),
}


@pytest.fixture(scope="module")
def checkpoints(qwen_model: Qwen3VLForConditionalGeneration, fp8_checkpoint_factory: Any) -> dict[str, Path]:
    """One checkpoint per format, written once for the module."""
    return {
        name: fp8_checkpoint_factory(
            qwen_model,
            name=name,
            block_size=block,
            scale_dtype=scale_dtype,
            modules_to_not_convert=skip,
            shards=shards,
            **QWEN_FP8,
        )
        for name, (block, scale_dtype, skip, shards, _) in FORMATS.items()
    }


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


# --- loads equal stock / the reference --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_matches_stock_bit_for_bit(name: str, checkpoints: dict[str, Path], image_inputs: Any) -> None:
    """State dict, rotary buffers and logits (with an image) identical to the expected model."""
    comparison = assert_matches_stock(checkpoints[name], inputs=image_inputs, plugin=PLUGIN)
    assert comparison.against == FORMATS[name][-1]
    assert type(comparison.ours) is Qwen3VLForConditionalGeneration
    load = comparison.ours.automodel_composition.load
    assert load.dequantized == len(_fp8_weights(checkpoints[name])) > 0
    assert load.dropped_keys == []  # dynamic activations: no activation scales on disk


def test_partial_edge_blocks_fill_a_several_block_grid(checkpoints: dict[str, Path]) -> None:
    """The 32x32 case really has partial edges: 200 = 6 * 32 + 8, on both sides of the MLP."""
    grids = _scale_shapes(checkpoints["32-fp32-scales-vision-fp8"])
    assert grids["model.language_model.layers.0.mlp.gate_proj.weight_scale_inv"] == [7, 2]
    assert grids["model.language_model.layers.0.mlp.down_proj.weight_scale_inv"] == [2, 7]
    assert grids["model.visual.blocks.0.attn.qkv.weight_scale_inv"] == [3, 1]


def test_stock_misreads_partial_edges_so_the_reference_is_used(checkpoints: dict[str, Path]) -> None:
    """transformers 5.24 derives the block from the grid: 200 rows in 2 blocks of 128 read as 2 x 100, silently.

    If this starts failing, stock learned partial edges: ``stock_reads_exactly`` can then say so.
    """
    path = checkpoints["128-fp32-scales"]
    assert not stock_reads_exactly(path)
    assert stock_reads_exactly(checkpoints["8-whole-blocks-fp32"])
    stock, reference = load_stock(path).state_dict(), reference_model(path).state_dict()
    gate = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(stock[gate], reference[gate])
    assert torch.equal(
        stock["model.language_model.layers.0.self_attn.q_proj.weight"],
        reference["model.language_model.layers.0.self_attn.q_proj.weight"],
    )


def test_unquantized_checkpoint_is_claimed_and_matches_stock(
    qwen_model: Any, unquantized_checkpoint_factory: Any, image_inputs: Any
) -> None:
    path = unquantized_checkpoint_factory(qwen_model)
    comparison = assert_matches_stock(path, inputs=image_inputs, plugin=PLUGIN, expected="stock")
    assert comparison.ours.automodel_composition.load.dequantized == 0


def test_fp32_load_matches_the_reference(checkpoints: dict[str, Path], image_inputs: Any) -> None:
    assert_matches_stock(checkpoints["32-fp32-scales-vision-fp8"], dtype=torch.float32, inputs=image_inputs)


def test_quantization_config_dropped_after_load(checkpoints: dict[str, Path]) -> None:
    model = automodel_plugins.from_pretrained(checkpoints["128-bf16-scales"])
    assert getattr(model.config, "quantization_config", None) is None
    assert model.automodel_composition.dequantized_from == "fp8"
    assert model.automodel_composition.adapter["granularity"] == "block 128x128"


def test_fp8_tensor_in_a_module_never_converted_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The vision blocks are FP8 on disk but the config says ``model.visual`` stays BF16: refuse, never guess."""
    path = _copy_checkpoint(checkpoints["32-fp32-scales-vision-fp8"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["model.visual", "lm_head"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="modules_to_not_convert"):
        automodel_plugins.from_pretrained(path)


@pytest.mark.parametrize(
    ("field", "held"),
    [
        ("text_config.num_hidden_layers", "model.language_model.layers: 2"),
        ("vision_config.depth", "model.visual.blocks"),
    ],
)
def test_layer_count_the_checkpoint_does_not_hold_fails_before_building(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, held: str
) -> None:
    """The host's structure check reads this plugin's runtime keys as they are (``model.visual.blocks.N``)."""
    path = _copy_checkpoint(checkpoints["32-fp32-scales-vision-fp8"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    section, name = field.split(".")
    config[section][name] = 10**6
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(
        "automodel_plugins.pipeline.load.load.build_on_meta", lambda *a, **k: pytest.fail("built")
    )
    with pytest.raises(ConfigMismatchError, match=rf"{field} is 1000000") as caught:
        automodel_plugins.from_pretrained(path)
    assert held in str(caught.value)


# --- rotary and forward -----------------------------------------------------------------------------------


def test_post_materialize_repairs_rotary_through_the_host(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook calls the host's ``repair_rotary``: text M-RoPE and vision axial tables both."""
    calls: list[int] = []
    real = automodel_plugins.repair_rotary
    monkeypatch.setattr(
        automodel_plugins, "repair_rotary", lambda model: calls.append(real(model)) or calls[-1]
    )
    automodel_plugins.from_pretrained(checkpoints["128-fp32-scales"])
    assert calls == [2]


def test_meta_build_then_to_empty_then_load_weights(checkpoints: dict[str, Path], image_inputs: Any) -> None:
    """The FSDP2 path: garbage rotary buffers after ``to_empty`` are recomputed; logits equal the reference."""
    path = checkpoints["32-bf16-scales-3-shards"]
    model = automodel_plugins.build_model(path)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    assert_same_logits(model.eval(), reference_model(path), image_inputs)


def test_forward_override_fused_loss_equals_stock(checkpoints: dict[str, Path], image_batch: Any) -> None:
    """fp32 load: the fused loss and its gradient through the image equal stock's; outputs keep the stock class."""
    path = checkpoints["8-whole-blocks-fp32"]
    comparison = assert_matches_stock(path, dtype=torch.float32, plugin=PLUGIN)
    ours, stock = comparison.ours, comparison.expected
    assert "forward" in vars(ours) and ours.automodel_composition.forward_overridden
    got, want = ours(**image_batch), stock(**image_batch)
    assert type(got) is MultimodalCausalLMOutputWithPast and got.image_outputs is not None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    got.loss.backward()
    want.loss.backward()
    for name in ("model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"):
        grad, expected = ours.get_parameter(name).grad, stock.get_parameter(name).grad
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0, msg=name)


def test_skip_logits_load_option(checkpoints: dict[str, Path], image_batch: Any) -> None:
    model = automodel_plugins.from_pretrained(checkpoints["8-whole-blocks-bf16"], skip_logits=True)
    out = model(**image_batch)
    assert out.logits is None and out.loss is not None
    assert model(**{k: v for k, v in image_batch.items() if k != "labels"}).logits is not None


# --- packaging --------------------------------------------------------------------------------------------


def test_plugin_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, automodel_plugins_qwen3_vl_fp8.plugin; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_lists_the_plugin_with_its_own_distribution() -> None:
    """``automodel-plugins list --json``: our own distribution and version, loaded, all four hooks.

    (Without ``--config``, which imports transformers: the claim itself is tested in-process.)
    """
    command = [str(Path(sys.executable).with_name("automodel-plugins")), "list", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env_without_selection())
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (record,) = [p for p in document["plugins"] if p["name"] == PLUGIN]
    assert record["distribution"] == DISTRIBUTION
    assert record["version"] == metadata.version(DISTRIBUTION) == _package_version() == "0.2.0"
    assert record["status"] == "loaded" and record["error"] is None
    assert record["hooks"] == [
        "claim_config",
        "forward_override",
        "post_materialize",
    ]  # the default adapter fits
    assert document["claims"] == [] and document["claimed_by"] is None


# --- helpers ----------------------------------------------------------------------------------------------


def _fp8_weights(path: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names += [k for k in handle.keys() if handle.get_slice(k).get_dtype() == "F8_E4M3"]  # noqa: SIM118
    return names


def _scale_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {k: handle.get_slice(k).get_shape() for k in handle.keys() if k.endswith("_scale_inv")}  # noqa: SIM118


def _copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _env_without_selection() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "AUTOMODEL_PLUGINS"}


def _package_version() -> str:
    import automodel_plugins_qwen3_vl_fp8

    return automodel_plugins_qwen3_vl_fp8.__version__


def test_fp8_resident_load_gives_the_dequantized_model_s_logits(
    checkpoints: dict[str, Path], image_inputs: Any
) -> None:
    """``dequantize=False`` through the host alone: the vision blocks' FP8 linears stay FP8 too."""
    from automodel_plugins import Fp8Linear

    path = checkpoints["32-fp32-scales-vision-fp8"]
    resident = automodel_plugins.from_pretrained(path, dtype=torch.float32, dequantize=False)
    dequantized = automodel_plugins.from_pretrained(path, dtype=torch.float32)
    layers = [name for name, m in resident.named_modules() if isinstance(m, Fp8Linear)]
    assert layers == resident.automodel_composition.fp8_resident  # in module order
    assert any(name.startswith("model.visual.blocks.") for name in layers)
    assert not any(name.startswith("model.visual.merger") for name in layers)  # modules_to_not_convert
    with torch.no_grad():
        assert torch.equal(resident(**image_inputs).logits, dequantized(**image_inputs).logits)
