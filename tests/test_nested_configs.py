"""Published configs whose nested ``model_type`` transformers' list does not hold, though its config classes load
them: they reach the stock path (issue 20, item 8).

* Kimi-K2.5 (``moonshotai/Kimi-K2.5``): ``text_config.model_type`` is ``"kimi_k2"``, which
  ``Kimi_K25Config.__post_init__`` rewrites to ``deepseek_v3``; the top-level ``architectures`` names the
  remote-code class ``KimiK25ForConditionalGeneration`` (never run here).
* Qwen3-Omni (``Qwen/Qwen3-Omni-30B-A3B-Instruct``): ``code2wav_config.model_type`` is ``""``
  (``Qwen3OmniMoeCode2WavConfig`` declares none, so transformers itself writes ``""``), beside
  ``thinker_config`` / ``talker_config`` that nest their own ``text_config``, ``vision_config``,
  ``audio_config`` and ``code_predictor_config``.

Each checkpoint is a tiny model of the stock transformers class saved by transformers itself (so every nested
field has the name transformers' config classes give it), with the published values put back where the hub's
``config.json`` differs from what transformers writes. The reference is transformers' own ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import automodel_plugins
from automodel_plugins.errors import ConfigError
from automodel_plugins.registry import Registry

PLUGINS = ("mistral3_fp8", "qwen3_vl_fp8", "qwen3_vl_moe_fp8")


def _save(model: torch.nn.Module, directory: Path, published: dict[str, Any]) -> Path:
    """``model.save_pretrained(directory)`` with ``published`` merged into its config.json (one level deep)."""
    model.save_pretrained(directory)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in published.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))
    return directory


@pytest.fixture(scope="module")
def kimi_k25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kimi-K2.5: DeepSeek-V3 text model (MLA, 4 routed experts, one dense layer), Kimi vision tower."""
    torch.manual_seed(0)
    text = transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    vision = transformers.Kimi_K25VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pos_emb_height=8,
        pos_emb_width=8,
        pos_emb_time=2,
    )
    config = transformers.Kimi_K25Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_hidden_size=32,
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
        tie_word_embeddings=False,
    )
    model = transformers.Kimi_K25ForConditionalGeneration(config)
    published = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        },
        "text_config": {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]},
    }
    return _save(model, tmp_path_factory.mktemp("kimi-k25"), published)


@pytest.fixture(scope="module")
def qwen3_omni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-Omni (thinker, talker, code2wav), as ``Qwen3OmniMoeForConditionalGeneration`` saves it."""
    torch.manual_seed(0)
    mrope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1], "interleaved": True}
    moe = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 32}
    moe |= {"intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}
    tokens = {
        "audio_token_id": 150,
        "image_token_id": 151,
        "video_token_id": 152,
        "audio_start_token_id": 153,
    }
    thinker = {
        "text_config": {**moe, "vocab_size": 160, "num_hidden_layers": 2, "rope_parameters": mrope},
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
            "patch_size": 4,
        },
        "audio_config": {
            "num_mel_bins": 16,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "d_model": 16,
            "output_dim": 32,
            "downsample_hidden_size": 8,
            "n_window": 4,
            "max_source_positions": 64,
        },
        **tokens,
        "user_token_id": 154,
    }
    talker = {
        # shared_expert_intermediate_size and spatial_merge_size: in the published talker config, read by
        # the modeling code, though the config classes do not declare them.
        "text_config": {
            **moe,
            "vocab_size": 64,
            "num_hidden_layers": 1,
            "shared_expert_intermediate_size": 32,
            "rope_parameters": mrope,
        },
        "code_predictor_config": {
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_code_groups": 4,
        },
        "num_code_groups": 4,
        "thinker_hidden_size": 32,
        "accept_hidden_layer": 1,
        "codec_pad_id": 58,
        "codec_bos_id": 59,
        "codec_eos_token_id": 60,
        "codec_nothink_id": 61,
        "codec_think_bos_id": 62,
        "codec_think_eos_id": 63,
        "vision_start_token_id": 155,
        "speaker_id": {"ethan": 57},
        "spatial_merge_size": 2,
        **tokens,
    }
    code2wav = {
        "codebook_size": 64,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_quantizers": 4,
        "upsample_rates": [2, 2],
        "upsampling_ratios": [2],
        "decoder_dim": 32,
        "sliding_window": 8,
    }
    config = transformers.Qwen3OmniMoeConfig(
        thinker_config=thinker,
        talker_config=talker,
        code2wav_config=code2wav,
        im_start_token_id=140,
        im_end_token_id=141,
        tts_pad_token_id=142,
        tts_bos_token_id=143,
        tts_eos_token_id=144,
        system_token_id=145,
        assistant_token_id=146,
        user_token_id=154,
    )
    model = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    return _save(model, tmp_path_factory.mktemp("qwen3-omni"), {})


def _raw(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def test_the_checkpoints_carry_the_published_nested_model_types(kimi_k25: Path, qwen3_omni: Path) -> None:
    """The inputs are what the issue describes: nested types outside transformers' list."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert _raw(kimi_k25)["text_config"]["model_type"] == "kimi_k2" not in CONFIG_MAPPING
    omni = _raw(qwen3_omni)
    assert omni["code2wav_config"]["model_type"] == "" not in CONFIG_MAPPING
    assert omni["thinker_config"]["audio_config"]["model_type"] == "qwen3_omni_moe_audio_encoder"
    assert (
        omni["talker_config"]["code_predictor_config"]["model_type"] == "qwen3_omni_moe_talker_code_predictor"
    )


def test_load_config_gives_what_autoconfig_gives(kimi_k25: Path, qwen3_omni: Path) -> None:
    kimi = automodel_plugins.load_config(kimi_k25)
    assert type(kimi) is transformers.Kimi_K25Config
    assert type(kimi.text_config) is transformers.DeepseekV3Config  # kimi_k2 rewritten by transformers
    assert kimi.to_dict() == transformers.AutoConfig.from_pretrained(kimi_k25).to_dict()
    omni = automodel_plugins.load_config(qwen3_omni)
    assert type(omni) is transformers.Qwen3OmniMoeConfig
    assert omni.code2wav_config.model_type == ""
    assert omni.to_dict() == transformers.AutoConfig.from_pretrained(qwen3_omni).to_dict()


@pytest.mark.parametrize("name", ["kimi_k25", "qwen3_omni"])
def test_no_plugin_claims_them_and_inspect_says_stock(
    request: pytest.FixtureRequest, plugin_registry: Any, name: str
) -> None:
    directory: Path = request.getfixturevalue(name)
    registry: Registry = plugin_registry(*PLUGINS)
    config = automodel_plugins.load_config(directory)
    verdicts = registry.claims(config)
    assert sorted(v.plugin for v in verdicts) == sorted(PLUGINS) and not any(v.claimed for v in verdicts)
    assert registry.winning_claim(config) is None
    description = automodel_plugins.describe_checkpoint(directory, registry=registry)
    assert description["plugin"] is None and description["load"] is None
    assert description["config"]["model_type"] == _raw(directory)["model_type"]


def test_kimi_k25_loads_as_stock_transformers_loads_it(kimi_k25: Path, plugin_registry: Any) -> None:
    plugin_registry(*PLUGINS)
    model = automodel_plugins.from_pretrained(kimi_k25, require_plugin=False, dtype=torch.float32)
    reference = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(kimi_k25, dtype=torch.float32)
    assert type(model) is transformers.Kimi_K25ForConditionalGeneration
    assert model.automodel_composition.plugin is None
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_qwen3_omni_loads_as_stock_transformers_loads_it(qwen3_omni: Path, plugin_registry: Any) -> None:
    plugin_registry(*PLUGINS)
    model = automodel_plugins.from_pretrained(qwen3_omni, require_plugin=False, dtype=torch.float32)
    reference = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        qwen3_omni, dtype=torch.float32
    )
    assert type(model) is transformers.Qwen3OmniMoeForConditionalGeneration
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(_same_bytes(ours[k], theirs[k]) for k in ours)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included: transformers 5.25 leaves the tiny talker's fused experts uninitialized at
    construction, so the saved checkpoint may hold NaN bytes, which both loads must read as they are."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def test_an_unknown_nested_type_transformers_refuses_is_still_named(tmp_path: Path) -> None:
    """What transformers does refuse (a sub-config it must build from its type) keeps naming the field."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k9"}})
    )
    with pytest.raises(ConfigError) as info:
        automodel_plugins.load_config(tmp_path)
    message = str(info.value)
    assert "unknown model_type 'kimi_k9' in field 'text_config.model_type'" in message
    assert "transformers cannot build this config" in message and len(message) < 1000


def test_require_plugin_says_no_plugin_claims_them(kimi_k25: Path, plugin_registry: Any) -> None:
    """The config is fine; what is missing is a plugin: the error says that, not that the config is bad."""
    from automodel_plugins.errors import NoPluginClaimError

    plugin_registry(*PLUGINS)
    with pytest.raises(NoPluginClaimError, match="no plugin claims model_type 'kimi_k25'"):
        automodel_plugins.from_pretrained(kimi_k25, require_plugin=True)


def test_the_inspect_command_reports_the_stock_path(qwen3_omni: Path, run_cli: Any) -> None:
    done = run_cli("inspect", "--json", str(qwen3_omni), env={"AUTOMODEL_PLUGINS": ",".join(PLUGINS)})
    assert done.returncode == 0, done.stderr
    description = json.loads(done.stdout)
    assert description["plugin"] is None and description["load"] is None
    assert description["config"]["model_type"] == "qwen3_omni_moe"
    assert len(description["claims"]) == len(PLUGINS)
