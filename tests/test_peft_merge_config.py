"""PEFT's own merge on an FP8-resident base keeps ``config.quantization_config`` truthful, so that a STOCK
``save_pretrained`` of the merged model writes a checkpoint every loader reads as the merged model.

The defect (before the fix): ``Fp8LoraLinear.merge`` gives each merged layer a dequantized stock ``nn.Linear``
base, but PEFT's ``merge_and_unload()`` / ``merge_adapter()`` (+ ``unload()``) never touched the config, which
kept naming the merged layers FP8 (only ``automodel_plugins.merge_lora`` listed them in
``modules_to_not_convert``). A stock ``save_pretrained`` then wrote their FP32/BF16 weights, without a scale,
under a config saying FP8. What transformers 5.25 does with that directory:

* on a machine without a CUDA/XPU device (as here), its FP8 quantizer switches to ``dequantize=True`` ("Using FP8
  quantized models requires a GPU or XPU, we will default to dequantizing"), and ``Fp8Dequantize`` passes a
  weight that has no ``weight_scale_inv`` sibling through unchanged: the logits come out right, by luck;
* on a CUDA device with compute capability >= 8.9 (H100; what the second test reproduces on CPU by keeping
  ``dequantize=False`` past ``validate_environment``, the only place transformers decides it), every merged layer
  becomes a transformers ``FP8Linear``: the merged weight is cast into ``float8_e4m3fn`` codes (FP8's rounding,
  0.014 on weights of 0.34) and its ``weight_scale_inv`` is MISSING from the checkpoint, so it is left
  uninitialized (the model is built on meta; seen: 0 for a per-tensor scale, -1.2e36 in a block grid). No error:
  the ``MISSING`` lines of the load report, and silently wrong layers.
* ``automodel_plugins.from_pretrained(dir)`` decides by each tensor's stored dtype, not by the config, so it
  loaded the merged layers right, dequantized or FP8-resident (``dequantize=False``: the merged layers plain
  ``nn.Linear``, the others ``Fp8Linear``), before and after the fix.

Now every FP8-resident module carries its name and the model's quantization record (set at load), and every
merge path updates the config: the merged layers join ``modules_to_not_convert``, an ``unmerge_adapter`` takes
them out again, and with no FP8 module left the quantization is dropped (and comes back on unmerge).

Reference, independent of the resident path: stock transformers loading the source checkpoint (dequantized on
CPU) with the same LoRA (same seed, non-zero ``B``) merged by PEFT. The checkpoints use dynamic activations
(static ones, which the resident layers keep: tests/test_static_activation_save.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from mistral3_checkpoints import (
    NOT_CONVERTED,
    Checkpoints,
    CheckpointSpec,
    checkpoints,
    edit_config,
    image_inputs,
    registry,
    stock_load,
)
from stock_fp8 import keep_fp8_on_cpu

import automodel_plugins
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.registry import Registry

peft = pytest.importorskip("peft")

__all__ = ["checkpoints", "registry"]  # the session fixtures, used here

F32 = torch.float32
SPECS = {
    "per-tensor": CheckpointSpec(activation_scale_name=None),
    "block": CheckpointSpec(block_size=(32, 32), activation_scale_name=None),  # 64 and 128: no partial blocks
}
ATTENTION = ["q_proj", "v_proj"]  # also in the (BF16, not converted) vision tower: already covered there
EVERY_FP8 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "model.language_model.layers"
MERGED = [f"{TEXT}.{i}.self_attn.{p}" for i in range(2) for p in ATTENTION]  # module order


@pytest.fixture(scope="module", params=sorted(SPECS))
def path(
    request: pytest.FixtureRequest, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy whose config says what it holds: no activation scales, so dynamic activations."""
    copy = checkpoints.copy(tmp_path_factory.mktemp(request.param) / "ckpt", SPECS[request.param])
    edit_config(copy, lambda config: config["quantization_config"].update(activation_scheme="dynamic"))
    return copy


def with_lora(model: Any, targets: list[str] = ATTENTION) -> Any:
    torch.manual_seed(1)  # the same non-zero adapters on every base: the merge moves the weights
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def resident(path: Path, registry: Registry, targets: list[str] = ATTENTION) -> Any:
    model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False, registry=registry)
    return with_lora(model, targets)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(**image_inputs(F32)).logits


def not_converted(config: Any) -> list[str]:
    return quantization_dict(config)["modules_to_not_convert"]


def test_stock_save_after_peft_merge_and_unload_loads_back_as_the_merged_model(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    merged = resident(path, registry).merge_and_unload()
    assert not_converted(merged.config) == [*NOT_CONVERTED, *MERGED]  # exactly the merged layers join
    expected = logits(with_lora(stock_load(path, dtype=F32)).merge_and_unload())
    assert torch.equal(logits(merged), expected)

    merged.save_pretrained(tmp_path / "merged")  # transformers' own save
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert saved["modules_to_not_convert"] == [*NOT_CONVERTED, *MERGED]
    stock = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=F32)
    assert torch.equal(logits(stock.eval()), expected)
    for dequantize in (True, False):
        ours = automodel_plugins.from_pretrained(
            tmp_path / "merged", dtype=F32, dequantize=dequantize, registry=registry
        )
        assert torch.equal(logits(ours), expected), dequantize
    fp8 = {n for n, m in ours.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 14 - len(MERGED) and not fp8 & set(MERGED)


def test_stock_transformers_keeping_fp8_builds_the_merged_layers_as_plain_linears(
    path: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What transformers builds on an FP8-capable GPU, where it does not dequantize: ``FP8Linear`` exactly for
    the layers the config names FP8. Its CPU forward needs its Triton kernels, so the weights are compared."""
    merged = resident(path, registry).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    keep_fp8_on_cpu(monkeypatch)
    stock, info = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "merged", dtype=F32, output_loading_info=True
    )
    # before the fix: the merged layers' weight_scale_inv, left as torch.empty's memory
    assert not info["missing_keys"], sorted(info["missing_keys"])
    for name, module in merged.named_modules():
        if not name.startswith(TEXT) or not isinstance(module, torch.nn.Linear):
            continue
        loaded = stock.get_submodule(name)
        if name in MERGED:
            assert type(module) is type(loaded) is torch.nn.Linear, name
            assert torch.equal(loaded.weight, module.weight), name
        else:
            assert type(loaded).__name__ == "FP8Linear", name
            assert torch.equal(loaded.weight.view(torch.uint8), module.weight), name  # the same codes
            assert torch.equal(
                loaded.weight_scale_inv.reshape(module.weight_scale_inv.shape), module.weight_scale_inv
            )


def test_merge_adapter_unmerge_adapter_and_unload_keep_the_config_truthful(
    path: Path, registry: Registry
) -> None:
    model = resident(path, registry)
    declared = quantization_dict(model.config)
    assert declared["modules_to_not_convert"] == list(NOT_CONVERTED)
    model.merge_adapter()
    assert not_converted(model.config) == [*NOT_CONVERTED, *MERGED]
    model.unmerge_adapter()  # the FP8 bases are back: the config says FP8 again, as loaded
    assert quantization_dict(model.config) == declared
    model.merge_adapter(safe_merge=True)
    unloaded = model.unload()  # keeps the merged bases
    assert not_converted(unloaded.config) == [*NOT_CONVERTED, *MERGED]
    safe = resident(path, registry).merge_and_unload(safe_merge=True)
    reference = automodel_plugins.merge_lora(resident(path, registry))
    assert (
        quantization_dict(safe.config)
        == quantization_dict(reference.config)
        == quantization_dict(unloaded.config)
    )


def test_merging_every_fp8_layer_drops_the_quantization_and_unmerging_brings_it_back(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    model = resident(path, registry, EVERY_FP8)
    declared = quantization_dict(model.config)
    model.merge_adapter()
    assert quantization_dict(model.config) is None  # nothing FP8 left
    model.unmerge_adapter()
    assert quantization_dict(model.config) == declared
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    expected = logits(with_lora(stock_load(path, dtype=F32), EVERY_FP8).merge_and_unload())
    stock = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=F32)
    assert torch.equal(logits(stock.eval()), expected)


def test_a_config_without_modules_to_not_convert_keeps_transformers_defaults_beside_the_merged_layers(
    path: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A written ``modules_to_not_convert`` replaces transformers' defaults (``lm_head``, ...), which apply only
    when the config lists none: the merged save must still keep them unconverted. The reference is what
    transformers builds from the source checkpoint itself (without dequantizing): the same modules, except that
    the merged layers are plain ``nn.Linear``."""
    source = Path(shutil.copytree(path, tmp_path / "source"))
    edit_config(source, lambda config: config["quantization_config"].pop("modules_to_not_convert"))
    merged = resident(source, registry).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    keep_fp8_on_cpu(monkeypatch)
    built = {}
    for name in ("source", "merged"):
        stock = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / name, dtype=F32)
        built[name] = {
            n: type(m).__name__ for n, m in stock.named_modules() if isinstance(m, torch.nn.Linear)
        }
    assert built["source"]["lm_head"] == "Linear"  # transformers' default
    assert built["merged"] == {n: "Linear" if n in MERGED else kind for n, kind in built["source"].items()}
