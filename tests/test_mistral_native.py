"""Mistral-native checkpoints (``params.json`` + ``consolidated*.safetensors``, native tensor names) as a source.

The reference is stock transformers holding the weights; the native files are written by this test's own
writer, which applies transformers' conversion in reverse from its own table (the inverse of
``convert_mistral3_weights_to_hf.py``'s ``STATE_DICT_MAPPING`` and ``permute_for_rope``), not the plugin's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError
from automodel_plugins.sources import load_config, resolve
from automodel_plugins.sources.native import translate_params
from automodel_plugins.testing.compare import assert_same_logits
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch, tiny_mistral3_config

LARGE_3_PARAMS = Path("/work/shared/reference/data/mistral-large-3-675b-instruct-2512.params.json")

# transformers' STATE_DICT_MAPPING (native -> legacy HF), reversed here: HF runtime name -> native key.
_TO_NATIVE = [
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.language_model\.norm\.weight$", "norm.weight"),
    (r"^model\.language_model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (
        r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight$",
        r"layers.\1.ffn_norm.weight",
    ),
    (
        r"^model\.language_model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight$",
        r"layers.\1.attention.w\2.weight",
    ),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight$",
        r"vision_encoder.transformer.layers.\1.\2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.attention\.(q|k|v|o)_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.attention.w\2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w1.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w2.weight",
    ),
    (
        r"^model\.vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w3.weight",
    ),
    (r"^model\.multi_modal_projector\.linear_1\.weight$", "vision_language_adapter.w_in.weight"),
    (r"^model\.multi_modal_projector\.linear_2\.weight$", "vision_language_adapter.w_out.weight"),
    (r"^model\.vision_tower\.ln_pre\.weight$", "vision_encoder.ln_pre.weight"),
    (r"^model\.vision_tower\.patch_conv\.weight$", "vision_encoder.patch_conv.weight"),
    (
        r"^model\.multi_modal_projector\.patch_merger\.merging_layer\.weight$",
        "patch_merger.merging_layer.weight",
    ),
    (r"^model\.multi_modal_projector\.norm\.weight$", "pre_mm_projector_norm.weight"),
]


def _native_key(name: str) -> str:
    for pattern, replacement in _TO_NATIVE:
        key, hits = re.subn(pattern, replacement, name)
        if hits:
            return key
    raise AssertionError(f"no native name for {name}")


def _unpermute_for_rope(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of transformers' ``permute_for_rope``: HF half-split rows back to Mistral's interleaved ones."""
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _native_tensors(model: Mistral3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().clone()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            if "vision_tower" in name:
                heads = config.vision_config.num_attention_heads
            elif "q_proj" in name:
                heads = config.text_config.num_attention_heads
            else:
                heads = config.text_config.num_key_value_heads
            value = _unpermute_for_rope(value, heads)
        out[_native_key(name)] = value.contiguous()
    return out


def _params_of(config: Any) -> dict[str, Any]:
    """The ``params.json`` a Ministral 3 VLM release carries for ``config`` (field names as published)."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "rope_theta": rope["rope_theta"],
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": text.max_position_embeddings,
        "yarn": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "factor": rope["factor"],
            "apply_scale": False,
            "beta": rope["beta_fast"],
            "alpha": rope["beta_slow"],
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": rope["llama_4_scaling_beta"],
        },
        "vision_encoder": {
            "image_token_id": config.image_token_id,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": config.spatial_merge_size,
            "hidden_size": vision.hidden_size,
            "num_channels": vision.num_channels,
            "image_size": vision.image_size,
            "max_image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "rope_theta": vision.rope_parameters["rope_theta"],
            "add_pre_mm_projector_layer_norm": True,
            "adapter_bias": config.multimodal_projector_bias,
        },
    }


@pytest.fixture(scope="module")
def dense_native(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mistral3ForConditionalGeneration]:
    torch.manual_seed(0)
    config = tiny_mistral3_config(vision={"hidden_act": "silu"})  # Mistral's vision FFN is SiLU-gated
    reference = Mistral3ForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("native")
    (directory / "params.json").write_text(json.dumps(_params_of(config)))
    save_file(_native_tensors(reference), directory / "consolidated.safetensors")
    return directory, reference


def test_resolver_takes_params_json_and_consolidated(dense_native: tuple[Path, Any]) -> None:
    directory, _ = dense_native
    location = resolve(directory)
    assert location.is_native
    assert location.config_file().name == "params.json"
    assert location.weights().file == directory / "consolidated.safetensors"


def test_hf_form_wins_when_both_are_present(tmp_path: Path, dense_native: tuple[Path, Any]) -> None:
    directory, reference = dense_native
    both = tmp_path / "both"
    both.mkdir()
    for name in ("params.json", "consolidated.safetensors"):
        (both / name).write_bytes((directory / name).read_bytes())
    reference.config.save_pretrained(both)
    location = resolve(both)
    assert not location.is_native
    assert location.config_file().name == "config.json"


def test_sharded_native_index_is_the_weights(tmp_path: Path, dense_native: tuple[Path, Any]) -> None:
    directory, _ = dense_native
    (tmp_path / "params.json").write_bytes((directory / "params.json").read_bytes())
    index = {"metadata": {}, "weight_map": {"norm.weight": "consolidated-00001-of-00001.safetensors"}}
    (tmp_path / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    assert resolve(tmp_path).weights().index == tmp_path / "consolidated.safetensors.index.json"


def test_translated_config_is_the_reference_config(dense_native: tuple[Path, Any]) -> None:
    directory, reference = dense_native
    config = load_config(directory)
    assert config.model_type == "mistral3" and config.text_config.model_type == "ministral3"
    want, got = reference.config, config
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert getattr(got.text_config, field) == getattr(want.text_config, field), field
    assert got.text_config.rope_parameters == want.text_config.rope_parameters
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "patch_size",
        "image_size",
        "num_channels",
        "hidden_act",
    ):
        assert getattr(got.vision_config, field) == getattr(want.vision_config, field), field
    assert got.vision_config.rope_parameters == want.vision_config.rope_parameters
    assert got.tie_word_embeddings is False
    for field in (
        "image_token_id",
        "spatial_merge_size",
        "vision_feature_layer",
        "multimodal_projector_bias",
    ):
        assert getattr(got, field) == getattr(want, field), field


def test_dense_native_loads_with_stock_logits(dense_native: tuple[Path, Any]) -> None:
    directory, reference = dense_native
    model = automodel_plugins.from_pretrained(directory, dtype=torch.float32)
    assert isinstance(model, Mistral3ForConditionalGeneration)
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))
    assert_same_logits(model, reference, mistral3_image_batch(reference.config, labels=False))


def test_fp8_native_dequantizes_like_the_reference(tmp_path: Path, dense_native: tuple[Path, Any]) -> None:
    """Mistral's own per-tensor FP8 (``qscale_weight``, ``qscale_act``) on the text linears, q/k included."""
    directory, reference = dense_native
    params = json.loads((directory / "params.json").read_text())
    params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    tensors = _native_tensors(reference)
    expected = Mistral3ForConditionalGeneration(reference.config).eval()
    expected.load_state_dict(reference.state_dict())
    linear = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")
    for key in [k for k in tensors if linear.match(k)]:
        weight = tensors[key].float()
        scale = weight.abs().max() / 448.0
        codes = (weight / scale).to(torch.float8_e4m3fn)
        tensors[key] = codes
        tensors[key.replace(".weight", ".qscale_weight")] = scale
        tensors[key.replace(".weight", ".qscale_act")] = torch.tensor(1.0)
    (tmp_path / "params.json").write_text(json.dumps(params))
    save_file(tensors, tmp_path / "consolidated.safetensors")
    # The reference: the same codes dequantized independently, then permuted as transformers' converter does.
    state = expected.state_dict()
    for name in state:
        key = _native_key(name)
        if key.replace(".weight", ".qscale_weight") in tensors:
            value = (tensors[key].float() * tensors[key.replace(".weight", ".qscale_weight")].float()).to(
                state[name].dtype
            )
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = (
                    reference.config.text_config.num_attention_heads
                    if "q_proj" in name
                    else reference.config.text_config.num_key_value_heads
                )
                half = value.shape[0] // heads // 2
                value = value.view(heads, half, 2, -1).transpose(1, 2).reshape(value.shape)
            state[name].copy_(value)
    model = automodel_plugins.from_pretrained(tmp_path, dtype=torch.float32)
    assert_same_logits(model, expected, text_batch(reference.config.text_config, labels=False))


def _large3() -> dict[str, Any]:
    return json.loads(LARGE_3_PARAMS.read_text())


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_large3_params_translate_and_build_on_meta() -> None:
    from transformers import AutoConfig

    data = translate_params(_large3())
    assert data["model_type"] == "mistral3" and data["text_config"]["model_type"] == "mistral4"
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (61, 7168, 128)
    assert (text.q_lora_rank, text.kv_lora_rank, text.qk_nope_head_dim, text.qk_rope_head_dim) == (
        1536,
        512,
        128,
        64,
    )
    assert (text.n_routed_experts, text.num_experts_per_tok, text.n_shared_experts) == (128, 4, 1)
    assert (text.moe_intermediate_size, text.intermediate_size, text.first_k_dense_replace) == (
        4096,
        16384,
        3,
    )
    assert text.rope_parameters["rope_type"] == "yarn" and text.rope_parameters["factor"] == 36.0
    assert text.rope_parameters["llama_4_scaling_beta"] == 0.1
    assert config.quantization_config["weight_block_size"] == [128, 128]
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert round(total / 1e9, 2) == 675.99
    assert round(vision / 1e9, 2) == 2.50


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda p: p.update(foo=1), "'foo'"),
        (lambda p: p.pop("dim"), "'dim'"),
        (lambda p: p["moe"].update(route_every_n=2), "'moe.route_every_n'"),
        (
            lambda p: p["llama_4_scaling"].update(original_max_position_embeddings=4096),
            "'llama_4_scaling.original_max_position_embeddings'",
        ),
        (lambda p: p.update(head_dim=128), "'head_dim'"),
        (lambda p: p["vision_encoder"].update(mm_projector_id="mlp"), "'vision_encoder.mm_projector_id'"),
        (lambda p: p["yarn"].update(gamma=1), "'yarn.gamma'"),
    ],
)
@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_bad_params_name_the_field(edit: Any, field: str) -> None:
    params = _large3()
    edit(params)
    with pytest.raises(ConfigError, match=re.escape(field)) as info:
        translate_params(params, "x/params.json")
    assert "params.json" in str(info.value)


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_unreadable_compressed_tensors_is_refused_with_the_reason() -> None:
    params = _large3()
    params["quantization_config"]["config_groups"]["FP8_BLOCK"]["weights"]["num_bits"] = 4
    with pytest.raises(UnsupportedQuantizationError, match=r"weights\.num_bits"):
        translate_params(params)


def _shard_native(source: Path, destination: Path) -> None:
    """``source``'s one consolidated file split in two, as Mistral names shards, with the index vLLM reads."""
    from safetensors.torch import load_file

    destination.mkdir()
    (destination / "params.json").write_bytes((source / "params.json").read_bytes())
    tensors = load_file(source / "consolidated.safetensors")
    names = ("consolidated-00001-of-00002.safetensors", "consolidated-00002-of-00002.safetensors")
    keys = sorted(tensors)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for name, half in zip(names, halves, strict=True):
        save_file({k: tensors[k] for k in half}, destination / name)
        weight_map.update(dict.fromkeys(half, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (destination / "consolidated.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_native_loads_with_stock_logits(tmp_path: Path, dense_native: tuple[Path, Any]) -> None:
    directory, reference = dense_native
    _shard_native(directory, tmp_path / "sharded")
    model = automodel_plugins.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))


def test_native_only_repo_downloads_params_and_consolidated_shards_only(
    fake_hub: Any, tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    directory, reference = dense_native
    _shard_native(directory, tmp_path / "sharded")
    extras = {"tekken.json": b"{}", "README.md": b"# native", "consolidated.safetensors": b"not read"}
    fake_hub.add_directory("mistralai/native-only", tmp_path / "sharded", extra=extras)
    fake_hub.reset_counters()
    model = automodel_plugins.from_pretrained("mistralai/native-only", dtype=torch.float32)
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))
    prefix = "mistralai/native-only:"
    served = {
        k[len(prefix) :] for k, n in fake_hub.bytes_served["files"].items() if k.startswith(prefix) and n
    }
    assert served == {
        "params.json",
        "consolidated.safetensors.index.json",
        "consolidated-00001-of-00002.safetensors",
        "consolidated-00002-of-00002.safetensors",
    }
