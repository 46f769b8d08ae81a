"""compressed-tensors FP8 (what llm-compressor writes: ``quant_method: "compressed-tensors"``, ``weight_scale``
multiplied scales, an ``ignore`` list with ``re:`` patterns) in an HF ``config.json``, for the Mistral 4 and the
dense Mistral3 HF forms: claims, ``inspect``, loads equal to an independent reference dequantization held by
stock transformers, ``dequantize=False``; and every scheme the host does not apply refused naming its field.

The checkpoints are the fine-grained ones of ``mistral4_checkpoints`` / ``mistral3_checkpoints`` rewritten as
llm-compressor stores them (same codes and scales, ``weight_scale`` names, the compressed-tensors dict), so the
references those modules compute from the original files hold for these too.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import ODD, CheckpointSpec, ModelSpec, checkpoint_tensors, legacy_name
from mistral3_checkpoints import tiny_model as tiny_dense_model
from mistral3_checkpoints import write_checkpoint as write_dense
from mistral4_checkpoints import LAYERS, reference_model, stored_tensors, tiny_model, write_checkpoint
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins import Claim, Decline
from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError
from automodel_plugins.fp8.quantization import parse_fp8_quantization
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch

BF16 = torch.bfloat16
PLUGIN = "mistral3_fp8"


CHANNEL = [1, 4096]
"""A block one row high and wider than any tiny row: the fine-grained writer's form of per-channel scales (the
grid is ``[out, 1]``, compressed-tensors' per-channel ``weight_scale``), rewritten as ``strategy: channel``."""


def fp8_block(block: list[int] | None) -> dict[str, Any]:
    """llm-compressor's dict as it writes it in config.json: FP8_BLOCK (``block``), FP8_DYNAMIC (per-channel
    weights, dynamic per-token activations: ``block`` :data:`CHANNEL`) or FP8 per tensor, static (``None``)."""
    channel = block is not None and block[0] == 1
    weights = {
        "actorder": None,
        "block_structure": None if channel else block,
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "observer": "static_minmax" if block else "minmax",
        "observer_kwargs": {},
        "strategy": "channel" if channel else "block" if block else "tensor",
        "symmetric": True,
        "type": "float",
    }
    activations = (
        {"dynamic": True, "num_bits": 8, "strategy": "token", "symmetric": True}
        if channel
        else {"dynamic": True, "group_size": 128, "num_bits": 8, "strategy": "group", "symmetric": True}
        if block
        else {"dynamic": False, "num_bits": 8, "strategy": "tensor", "symmetric": True}
    )
    return {
        "config_groups": {
            "FP8_BLOCK" if block else "group_0": {
                "format": "float-quantized",
                "input_activations": {**activations, "type": "float"},
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*mlp.gate$", "lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.3.dev29",
    }


def as_compressed_tensors(source: Path, destination: Path) -> Path:
    """``source`` (fine-grained FP8, ``weight_scale_inv``) as llm-compressor stores the same values: scales
    named ``weight_scale``, static activation scales ``input_scale``, the compressed-tensors dict."""
    destination.mkdir(parents=True)
    renamed = {
        key.replace("weight_scale_inv", "weight_scale").replace("activation_scale", "input_scale"): value
        for key, value in stored_tensors(source).items()
    }
    save_file(renamed, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    declared = config.pop("quantization_config")
    config["quantization_config"] = fp8_block(declared["weight_block_size"])
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


def eager(model: Any) -> Any:
    model.set_experts_implementation("eager")
    return model.eval()


def batches(config: Any) -> list[dict[str, torch.Tensor]]:
    image = mistral3_image_batch(config, batch=2, seq=16, image_hw=(32, 32), labels=False, dtype=BF16)
    return [text_batch(config, batch=2, seq=12, labels=False), image]


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def mistral4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(fine-grained original, compressed-tensors copy) per form: 16x16 blocks (partial edge blocks: the
    40-row ``kv_a_proj_with_mqa``, 24-row experts), 8x8 blocks (expert pieces on block boundaries), per tensor."""
    model = tiny_model()
    root = tmp_path_factory.mktemp("ct-mistral4")
    out = {}
    for name, form, block in (
        ("block", "block-per-expert", (16, 16)),
        ("aligned", "block-per-expert", (8, 8)),
        ("tensor", "per-tensor", (16, 16)),
        ("channel", "block-per-expert", tuple(CHANNEL)),
    ):
        original = write_checkpoint(model, root / f"{name}-fg", form, block=block)
        out[name] = (original, as_compressed_tensors(original, root / f"{name}-ct"))
    return out


@pytest.mark.parametrize("form", ["block", "aligned", "tensor", "channel"])
def test_mistral4_loads_bit_identical_to_the_reference(mistral4: dict[str, Any], form: str) -> None:
    original, path = mistral4[form]
    ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16))
    expected = eager(reference_model(original))
    assert_same_state_dict(ours, expected)
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)
    assert "compressed-tensors" in ours.automodel_composition.claim_reason
    granularity = {
        "block": "block 16x16",
        "aligned": "block 8x8",
        "tensor": "per-tensor",
        "channel": "per-channel",
    }
    assert ours.automodel_composition.adapter["granularity"] == granularity[form]


@pytest.mark.parametrize("form", ["block", "aligned"])
def test_mistral4_dequantize_false_keeps_fp8_with_the_same_logits(
    mistral4: dict[str, Any], form: str
) -> None:
    """The attention and dense linears stay FP8 in both; the experts too where their per-expert pieces start
    on block boundaries (8x8), else they are dequantized with the reason (16x16: up rows start at 24)."""
    original, path = mistral4[form]
    if form == "block":
        with pytest.warns(UserWarning, match="not on a 16x16 block boundary"):
            ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False))
    else:
        ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False))
    attention = ours.model.language_model.layers[0].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert isinstance(getattr(attention, name), Fp8Linear), name
    experts = ours.get_submodule("model.language_model.layers.1.mlp.experts")
    assert isinstance(experts, Fp8Experts) == (form != "block")
    # the config says what the model holds, in compressed-tensors' own terms (experts dequantized: ignored)
    section = ours.config.quantization_config
    assert "modules_to_not_convert" not in section
    assert ("model.language_model.layers.1.mlp.experts" in section["ignore"]) == (form == "block")
    parse_fp8_quantization(ours.config)
    stored = stored_tensors(path)
    key = "language_model.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert torch.equal(attention.kv_a_proj_with_mqa.weight.view(torch.uint8), stored[key].view(torch.uint8))
    expected = eager(reference_model(original))
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)


def test_mistral4_inspect_plans_the_compressed_tensors_load(mistral4: dict[str, Any], run_cli: Any) -> None:
    _, path = mistral4["block"]
    listing = run_cli("list", "--config", str(path / "config.json"), "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["claimed_by"] == PLUGIN
    described = describe_checkpoint(path)
    assert described["plugin"] == PLUGIN and described["bytes_read"] == 0
    assert described["config"]["quantization"] == {
        "quant_method": "compressed-tensors",
        "weight_block_size": [16, 16],
        "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head"],
    }
    load = described["load"]
    assert (load["granularity"], load["scale_names"]) == ("block 16x16", ["weight_scale"])
    assert load["assembled_tensors"] == 2 * (LAYERS - 1)


@pytest.mark.parametrize(("form", "dequantize"), [("tensor", True), ("channel", True), ("channel", False)])
def test_mistral4_source_save_is_the_source(
    mistral4: dict[str, Any], tmp_path: Path, form: str, dequantize: bool
) -> None:
    """Saved as it came: the compressed-tensors dict and every tensor (``weight_scale`` and all) unchanged."""
    _, path = mistral4[form]
    model = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=dequantize)
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    saved, source = stored_tensors(tmp_path / "out"), stored_tensors(path)
    assert saved.keys() == source.keys()
    for key, value in source.items():
        assert saved[key].dtype == value.dtype and torch.equal(
            saved[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), key
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((path / "config.json").read_text())["quantization_config"]


# --- the dense Mistral3 (Ministral 3 text) -------------------------------------------------------------------


def _dense_reference(
    path: Path, model: Mistral3ForConditionalGeneration, block: list[int] | None
) -> Mistral3ForConditionalGeneration:
    """Stock class at normal init holding the file's FP8 codes times their scales (fp32 product, each block's
    scale over its possibly partial block, cast once), written here from the tensors alone."""
    stored = checkpoint_tensors(path)
    expected = Mistral3ForConditionalGeneration._from_config(model.config, dtype=BF16).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        key = legacy_name(name)
        value = stored[key]
        if value.dtype == torch.float8_e4m3fn:
            scale = stored[key.removesuffix("weight") + "weight_scale"].float()
            if block is not None:
                scale = scale.repeat_interleave(block[0], 0)[: value.shape[0]]
                scale = scale.repeat_interleave(block[1], 1)[:, : value.shape[1]]
            value = value.float() * scale
        state[name] = value.to(BF16)
        assert state[name].shape == tensor.shape, name
    expected.load_state_dict(state, strict=True)
    return expected


@pytest.mark.parametrize(
    ("spec", "block"),
    [
        (
            CheckpointSpec(
                model=ODD, block_size=(16, 16), scale_name="weight_scale", activation_scale_name=None
            ),
            [16, 16],
        ),
        (CheckpointSpec(scale_name="weight_scale", activation_scale_name="input_scale"), None),
        (
            CheckpointSpec(
                model=ODD, block_size=tuple(CHANNEL), scale_name="weight_scale", activation_scale_name=None
            ),
            CHANNEL,
        ),
    ],
    ids=["block-partial-edges", "tensor-static", "channel"],
)
def test_dense_mistral3_loads_like_the_reference(
    tmp_path: Path, spec: CheckpointSpec, block: list[int] | None
) -> None:
    model = tiny_dense_model(spec.model)
    path = write_dense(model, tmp_path / "ct", spec)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = fp8_block(block)
    (path / "config.json").write_text(json.dumps(config))
    expected = _dense_reference(path, model, block)
    ours = automodel_plugins.from_pretrained(path, dtype=BF16)
    assert_same_state_dict(ours, expected)
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)
    resident = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False)
    assert isinstance(resident.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    for inputs in batches(expected.config):
        assert_same_logits(resident, expected, inputs)


# --- claims and refusals --------------------------------------------------------------------------------------


class _Config:
    def __init__(self, quantization: dict[str, Any]) -> None:
        self.quantization_config = quantization


def _edited(edit: Any, block: list[int] | None = [128, 128]) -> dict[str, Any]:  # noqa: B006
    section = copy.deepcopy(fp8_block(block))
    edit(section, next(iter(section["config_groups"].values())))
    return section


UNSUPPORTED = {
    "int4-weights": (
        lambda s, g: g["weights"].update(type="int", num_bits=4, strategy="group", group_size=128),
        "weights.type",
    ),
    "int8-weights": (lambda s, g: g["weights"].update(type="int", strategy="channel"), "weights.type"),
    "nvfp4": (
        lambda s, g: g["weights"].update(num_bits=4, strategy="tensor_group", group_size=16),
        "num_bits",
    ),
    "fp8-dynamic-weights": (lambda s, g: g["weights"].update(dynamic=True), "weights.dynamic"),
    "asymmetric": (lambda s, g: g["weights"].update(symmetric=False), "weights.symmetric"),
    "per-group": (
        lambda s, g: g["weights"].update(strategy="group", group_size=128, block_structure=None),
        "weights.strategy",
    ),
    "activation-only": (lambda s, g: g.update(weights=None), "FP8_BLOCK.weights"),
    "two-groups": (lambda s, g: s["config_groups"].update(other=copy.deepcopy(g)), "config_groups"),
    "pack-quantized": (lambda s, g: s.update(format="pack-quantized"), "quantization_config.format"),
    "kv-cache": (lambda s, g: s.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    "sparsity": (lambda s, g: s.update(sparsity_config={"format": "sparse-24"}), "sparsity_config"),
    "output-activations": (lambda s, g: g.update(output_activations={"num_bits": 8}), "output_activations"),
    "frozen": (lambda s, g: s.update(quantization_status="frozen"), "quantization_status"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_schemes_are_refused_naming_the_field(case: str) -> None:
    edit, field = UNSUPPORTED[case]
    with pytest.raises(UnsupportedQuantizationError, match=field.replace(".", r"\.")) as info:
        parse_fp8_quantization(_Config(_edited(edit)), path="repo/config.json")
    assert "repo/config.json" in str(info.value) and "quantization_config" in str(info.value)


@pytest.mark.parametrize("case", ["int4-weights", "per-group", "activation-only"])
def test_unsupported_schemes_are_declined_naming_the_field(case: str) -> None:
    """Not the host's to apply: declined (stock transformers' compressed-tensors integration may serve it),
    the reason naming the field; loading with ``require_plugin`` then fails."""
    from automodel_plugins_mistral3_fp8 import plugin
    from mistral4_checkpoints import tiny_config

    edit, field = UNSUPPORTED[case]
    config = tiny_config()
    config.quantization_config = _edited(edit)
    answer = plugin.claim_config(config)
    assert isinstance(answer, Decline) and field in answer.reason


@pytest.mark.parametrize("block", [[128, 128], None, CHANNEL], ids=["block", "tensor", "channel"])
def test_fp8_schemes_are_claimed_by_mistral3_and_mistral4(block: list[int] | None) -> None:
    from automodel_plugins_mistral3_fp8 import plugin
    from mistral3_checkpoints import tiny_config as dense_config
    from mistral4_checkpoints import tiny_config, tiny_text_config

    for config in (tiny_config(), tiny_text_config(), dense_config(ModelSpec())):
        config.quantization_config = fp8_block(block)
        claim = plugin.claim_config(config)
        shown = {None: "per-tensor FP8", 128: "128x128 block FP8", 1: "per-channel FP8"}[block and block[0]]
        assert isinstance(claim, Claim) and f"compressed-tensors {shown}" in claim.reason


def test_parsed_settings() -> None:
    parsed = parse_fp8_quantization(_Config(fp8_block([128, 128])))
    assert (parsed.weight_block_size, parsed.activation_scheme) == ((128, 128), "dynamic")
    assert parsed.modules_to_not_convert == ("lm_head",)  # re: patterns leave it to the tensors' dtypes
    parsed = parse_fp8_quantization(_Config(fp8_block(None)))
    assert (parsed.weight_block_size, parsed.activation_scheme) == (None, "static")
    parsed = parse_fp8_quantization(_Config(fp8_block(CHANNEL)))
    assert (parsed.weight_block_size, parsed.activation_scheme) == ((1, 2**31 - 1), "dynamic")


@pytest.mark.parametrize(
    ("ignore", "field"), [(["re:("], r"ignore\[0\]"), ([7], r"ignore\[0\]"), ("lm_head", r"ignore'")]
)
def test_a_malformed_ignore_list_is_refused_naming_the_entry(ignore: Any, field: str) -> None:
    section = fp8_block([128, 128])
    section["ignore"] = ignore
    with pytest.raises(ConfigError, match=field):
        parse_fp8_quantization(_Config(section), path="config.json")


def test_an_ignored_module_holding_fp8_is_refused(tmp_path: Path, mistral4: dict[str, Any]) -> None:
    """``ignore`` naming a module whose weight is FP8 on disk: config and checkpoint disagree."""
    from automodel_plugins.errors import CheckpointError

    path = shutil.copytree(mistral4["tensor"][1], tmp_path / "disagree")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.language_model.layers.0.self_attn.o_proj")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"o_proj.*modules_to_not_convert"):
        automodel_plugins.from_pretrained(path, dtype=BF16)


def test_merged_lora_layers_join_the_ignore_list(mistral4: dict[str, Any]) -> None:
    """After ``merge_lora`` on an FP8-resident compressed-tensors model, the merged (now BF16) layers are named
    in its ``ignore`` (compressed-tensors' own field, not ``modules_to_not_convert`` beside it), so the config
    still reads back: the FP8 layers left are still read as FP8, the merged ones as unquantized."""
    import peft

    _, path = mistral4["aligned"]
    model = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_b_proj"]))
    merged = automodel_plugins.merge_lora(model)
    section = merged.config.quantization_config
    assert "modules_to_not_convert" not in section
    names = [f"model.language_model.layers.{n}.self_attn.q_b_proj" for n in range(LAYERS)]
    assert section["ignore"][-LAYERS:] == names
    assert "model.language_model.layers.0.self_attn.kv_b_proj" not in section["ignore"]
    assert not any("vision_tower" in name or name == "lm_head" for name in section["ignore"][4:])
    assert parse_fp8_quantization(merged.config).modules_to_not_convert == ("lm_head", *names)


def test_fused_bf16_experts_beside_compressed_tensors_linears(tmp_path: Path) -> None:
    """llm-compressor quantizes ``Linear`` modules: transformers' fused experts (3-D parameters, no ``Linear``)
    stay BF16 while the attention, dense and shared-expert linears are FP8. That loads as the reference too,
    the experts as stored (no warning with ``dequantize=False``: BF16 experts are simply BF16)."""
    original = write_checkpoint(tiny_model(), tmp_path / "fg", "per-tensor")
    stored = stored_tensors(original)
    tensors = {}
    for key, value in stored.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = (value.float() * stored[f"{key}_scale_inv"].float()).to(BF16)
        elif ".mlp.experts." not in key:
            tensors[
                key.replace("weight_scale_inv", "weight_scale").replace("activation_scale", "input_scale")
            ] = value
    path = tmp_path / "ct"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    config["quantization_config"] = fp8_block(None)
    (path / "config.json").write_text(json.dumps(config))
    expected = eager(reference_model(original))
    ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16))
    assert_same_state_dict(ours, expected)
    resident = eager(automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False))
    assert resident.automodel_composition.fp8_not_resident == []
    assert isinstance(resident.model.language_model.layers[1].mlp.shared_experts.up_proj, Fp8Linear)
    for inputs in batches(expected.config):
        assert_same_logits(resident, expected, inputs)


def test_a_declined_scheme_with_require_plugin_is_an_error_naming_the_field(
    tmp_path: Path, mistral4: dict[str, Any]
) -> None:
    from automodel_plugins.errors import NoPluginClaimError

    path = shutil.copytree(mistral4["tensor"][1], tmp_path / "int4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = _edited(UNSUPPORTED["int4-weights"][0])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NoPluginClaimError, match=r"weights\.type"):
        automodel_plugins.from_pretrained(path, dtype=BF16, require_plugin=True)
