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
from mistral_native_checkpoints import (
    MLA_TO_NATIVE,
    mla_native_tensors,
    mla_params_of,
    native_key,
    native_tensors,
    params_of,
    tiny_mla_model,
    unpermute_for_rope,
    write_fp8_native,
)
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError
from automodel_plugins.sources import load_config, resolve
from automodel_plugins.sources.native import translate_params
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch, tiny_mistral3_config

LARGE_3_PARAMS = Path("/work/shared/reference/data/mistral-large-3-675b-instruct-2512.params.json")


@pytest.fixture(scope="module")
def dense_native(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mistral3ForConditionalGeneration]:
    torch.manual_seed(0)
    config = tiny_mistral3_config(vision={"hidden_act": "silu"})  # Mistral's vision FFN is SiLU-gated
    reference = Mistral3ForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("native")
    (directory / "params.json").write_text(json.dumps(params_of(config)))
    save_file(native_tensors(reference), directory / "consolidated.safetensors")
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
    tensors = write_fp8_native(directory, reference, tmp_path)
    expected = Mistral3ForConditionalGeneration(reference.config).eval()
    expected.load_state_dict(reference.state_dict())
    # The reference: the same codes dequantized independently, then permuted as transformers' converter does.
    state = expected.state_dict()
    for name in state:
        key = native_key(name)
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


# --- Mistral Large 3 at full size: a header-only native checkpoint planned ---------------------------------

_BF16_LEAVES = ("kv_a_proj_with_mqa", "q_a_proj", "gate")  # the compressed-tensors ignore list's regexes


def _large3_native_specs(model: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(native key, dtype, shape)`` of every tensor of the Large 3 release as its quantization_config says:
    FP8 text linears with a BF16 ``weight_scale`` per 128x128 block, the ignored modules BF16."""
    text = model.config.text_config
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def linear(key: str, shape: tuple[int, int], fp8: bool) -> None:
        if not fp8:
            specs.append((key, torch.bfloat16, shape))
            return
        specs.append((key, torch.float8_e4m3fn, shape))
        grid = (-(-shape[0] // 128), -(-shape[1] // 128))
        specs.append((key.removesuffix("weight") + "weight_scale", torch.bfloat16, grid))

    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        layer = re.match(
            r"^model\.language_model\.layers\.(\d+)\.(.+)\.(weight|gate_up_proj|down_proj)$", name
        )
        if layer is None:
            if name.startswith("model.language_model."):
                rest = name[len("model.language_model.") :].replace("embed_tokens.", "tok_embeddings.")
                specs.append((rest, torch.bfloat16, shape))
            elif name == "lm_head.weight":
                specs.append(("output.weight", torch.bfloat16, shape))
            else:
                specs.append((native_key(name), torch.bfloat16, shape))
            continue
        n, module, leaf = layer.groups()
        if module == "mlp.experts":
            width, hidden = text.moe_intermediate_size, text.hidden_size
            for e in range(text.n_routed_experts):
                if leaf == "gate_up_proj":
                    linear(f"layers.{n}.experts.{e}.w1.weight", (width, hidden), True)
                    linear(f"layers.{n}.experts.{e}.w3.weight", (width, hidden), True)
                else:
                    linear(f"layers.{n}.experts.{e}.w2.weight", (hidden, width), True)
            continue
        key = f"layers.{n}.{MLA_TO_NATIVE[module]}.weight"
        if len(shape) == 2:
            linear(key, shape, not module.endswith(_BF16_LEAVES))
        else:
            specs.append((key, torch.bfloat16, shape))
    return specs


def _write_header_only(
    directory: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shards: int
) -> int:
    """Sparse ``consolidated-0000X-of-0000N.safetensors`` shards holding only real headers, and their index."""
    from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec

    directory.mkdir()
    per = -(-len(specs) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = [TensorSpec(key, dtype, shape) for key, dtype, shape in specs[i * per : (i + 1) * per]]
        name = f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"
        SafetensorsWriter.create(directory / name, FileLayout.plan(part, {"format": "pt"})).close(sync=False)
        weight_map.update(dict.fromkeys((spec.name for spec in part), name))
        total += sum(spec.nbytes for spec in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    (directory / "params.json").write_bytes(LARGE_3_PARAMS.read_bytes())
    return total


class _Mistral4Claim:
    """Stands in for the ``mistral3`` + ``mistral4`` claim another change adds: the Mistral3 plugin's own
    adapter and rotary hooks, claiming the MoE generation too."""

    from automodel_plugins import hookimpl

    @hookimpl
    def claim_config(self, config: Any) -> Any:
        from automodel_plugins import Claim

        text = getattr(getattr(config, "text_config", None), "model_type", None)
        if getattr(config, "model_type", None) == "mistral3" and text == "mistral4":
            return Claim(priority=0, reason="test stand-in for the mistral4 claim")
        return None

    @hookimpl
    def state_dict_adapter(self, config: Any, checkpoint: Any) -> Any:
        from automodel_plugins_mistral3_fp8 import plugin

        return plugin.state_dict_adapter(config, checkpoint)


@pytest.fixture(scope="module")
def large3_header_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from transformers import AutoConfig

    data = translate_params(_large3())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    directory = tmp_path_factory.mktemp("large3") / "Mistral-Large-3-675B-Instruct-2512"
    return directory, _write_header_only(directory, _large3_native_specs(model), shards=8)


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_large3_header_only_native_checkpoint_is_planned(large3_header_only: tuple[Path, int]) -> None:
    from automodel_plugins.pipeline.load.describe import describe_checkpoint
    from automodel_plugins.registry import Registry

    directory, declared = large3_header_only
    registry = Registry()
    registry.register(_Mistral4Claim(), "mistral4_stand_in")
    described = describe_checkpoint(directory, registry=registry)
    assert described["bytes_read"] == 0 and described["plugin"] == "mistral4_stand_in"
    assert described["checkpoint"]["tensor_bytes"] == declared
    assert described["config"]["text_model_type"] == "mistral4"
    load = described["load"]
    assert (load["layout"], load["granularity"], load["scale_names"]) == (
        "native",
        "block 128x128",
        ["weight_scale"],
    )
    layers, moe_layers, experts, vision_layers = 61, 61 - 3, 128, 48
    # fused gate_up/down per MoE layer from per-expert pieces; vision q/k: one piece each, in rotary order
    assert load["assembled_tensors"] == 2 * moe_layers + 2 * vision_layers
    assert load["pieces"] == 3 * experts * moe_layers + 2 * vision_layers
    # FP8: q_b, kv_b, o per layer; w1/w2/w3 of the dense layers and of the shared experts; the fused experts
    assert load["fp8_tensors"] == 3 * layers + 3 * 3 + 3 * moe_layers + 2 * moe_layers
    assert load["scale_keys"] == described["checkpoint"]["fp8_tensors"]


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_large3_inspect_names_the_claim_or_its_absence(
    large3_header_only: tuple[Path, int], run_cli: Any
) -> None:
    """Until the ``mistral4`` claim lands, ``inspect`` reports that no plugin claims Large 3 (the Mistral3
    plugin's decline names the text model); once it does, the plan is the native one."""
    directory, declared = large3_header_only
    result = run_cli("inspect", str(directory), "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["bytes_read"] == 0 and described["checkpoint"]["tensor_bytes"] == declared
    if described["plugin"] is None:
        (verdict,) = [v for v in described["claims"] if v["plugin"] == "mistral3_fp8"]
        assert not verdict["claimed"] and "mistral4" in verdict["reason"]
    else:
        assert described["load"]["layout"] == "native"


# --- native in, native out ------------------------------------------------------------------------------------


def _stored(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a directory's safetensors files: dtype, shape and raw bytes."""
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(key)
                raw = (
                    tensor.contiguous().view(torch.uint8).numpy().tobytes()
                    if tensor.dim()
                    else tensor.reshape(1).view(torch.uint8).numpy().tobytes()
                )
                out[key] = (str(tensor.dtype), tuple(tensor.shape), raw)
    return out


@pytest.mark.parametrize("form", ["bf16", "fp8"])
def test_native_in_native_out_is_byte_identical(
    tmp_path: Path, dense_native: tuple[Path, Any], form: str
) -> None:
    directory, reference = dense_native
    source = directory
    if form == "fp8":
        source = tmp_path / "fp8"
        write_fp8_native(directory, reference, source)
    model = automodel_plugins.from_pretrained(source, dtype=torch.float32)
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["consolidated.safetensors", "params.json"]
    assert (tmp_path / "out" / "params.json").read_bytes() == (source / "params.json").read_bytes()
    assert _stored(tmp_path / "out") == _stored(source)


def test_native_out_shards_as_mistral_names_them_and_loads_back(
    tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    directory, reference = dense_native
    model = automodel_plugins.from_pretrained(directory, dtype=torch.float32)
    automodel_plugins.save_pretrained(model, tmp_path / "out", max_shard_size=200_000)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [n for n in names if n.startswith("consolidated-")]
    assert len(shards) > 1 and all(
        re.fullmatch(r"consolidated-\d{5}-of-\d{5}\.safetensors", n) for n in shards
    )
    assert set(names) == {*shards, "consolidated.safetensors.index.json", "params.json"}
    assert _stored(tmp_path / "out") == _stored(directory)
    again = automodel_plugins.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_same_logits(again, reference, text_batch(reference.config.text_config, labels=False))


def test_convert_native_to_hf_streams_into_transformers_form(
    tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    """``convert`` of a native checkpoint writes transformers' form (config.json, HF names, q/k rows in
    half-split order), which stock transformers loads with the reference's logits."""
    from automodel_plugins.pipeline.save.convert import convert_checkpoint

    directory, reference = dense_native
    source = tmp_path / "fp8"
    write_fp8_native(directory, reference, source)
    convert_checkpoint(source, tmp_path / "hf", to="bf16")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "config.json" in names and "params.json" not in names and "consolidated.safetensors" not in names
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16)
    assert_same_state_dict(ours, stock)
    assert_same_logits(stock, ours, text_batch(reference.config.text_config, labels=False))


def test_convert_layout_native_dequantizes_in_native_form(
    tmp_path: Path, dense_native: tuple[Path, Any], run_cli: Any
) -> None:
    """``convert --layout native --to bf16`` of Mistral's FP8: native names and shapes, q/k rows back in rotary
    order, params.json without its quantization; loaded back, the values ``from_pretrained`` gives the FP8."""
    directory, reference = dense_native
    source = tmp_path / "fp8"
    stored = write_fp8_native(directory, reference, source)
    result = run_cli("convert", str(source), str(tmp_path / "bf16"), "--to", "bf16", "--layout", "native")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "bf16"
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    params = json.loads((out / "params.json").read_text())
    assert "quantization" not in params
    assert params == {
        k: v for k, v in json.loads((source / "params.json").read_text()).items() if k != "quantization"
    }
    written = _stored(out)
    assert set(written) == {k for k in stored if not k.endswith(("qscale_weight", "qscale_act"))}
    assert all(dtype == "torch.bfloat16" for dtype, _, _ in written.values())
    # q/k in rotary order on disk: the FP8 source's codes times its scale, rounded to BF16, row for row
    key = "layers.0.attention.wq.weight"
    expected = (stored[key].float() * stored["layers.0.attention.wq.qscale_weight"].float()).to(
        torch.bfloat16
    )
    assert written[key][2] == expected.view(torch.uint8).numpy().tobytes()
    ours = automodel_plugins.from_pretrained(out, dtype=torch.bfloat16)
    again = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16)
    assert_same_state_dict(ours, again)


def test_convert_layout_native_from_hf_form_is_the_reference_writers_native_form(
    tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    """HF form -> native: every tensor under the name and in the row order this test's own writer (transformers'
    converter run backwards) gives, byte for byte in BF16, and the ``params.json`` a Ministral 3 release
    carries for the config."""
    from automodel_plugins.pipeline.save.convert import convert_checkpoint

    _, reference = dense_native
    reference.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", to="bf16", layout="native")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    assert json.loads((out / "params.json").read_text()) == params_of(reference.config)
    expected = {
        key: (str(torch.bfloat16), tuple(t.shape), t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        for key, t in native_tensors(reference).items()
    }
    assert _stored(out) == expected


def test_fp8_save_of_a_native_model_keeps_the_translated_modules_to_not_convert(
    tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    """Another format than the source's writes transformers' form; its default ``modules_to_not_convert`` is
    the one the native ``quantization`` declares once translated (vision tower, projector, head)."""
    directory, reference = dense_native
    write_fp8_native(directory, reference, tmp_path / "fp8")
    model = automodel_plugins.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="fp8-tensor")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "lm_head",
    ]
    assert not (tmp_path / "out" / "params.json").exists()
    written = _stored(tmp_path / "out")
    assert all(
        not key.startswith("model.vision_tower") or dtype == "torch.bfloat16"
        for key, (dtype, _, _) in written.items()
    )


def test_fp8_resident_native_load_keeps_rotary_order_q_k_fp8(
    tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    """``dequantize=False``: every text projection stays FP8, q/k included. Their rows are stored in Mistral's
    rotary order; the codes are permuted into transformers' order and keep their per-tensor scale, so the
    module's codes, put back in rotary order by the test's own inverse, are the file's bytes; the logits are
    the dequantized load's, and a source save gives the file back."""
    from automodel_plugins.model.fp8_linear import Fp8Linear

    directory, reference = dense_native
    stored = write_fp8_native(directory, reference, tmp_path / "fp8")
    resident = automodel_plugins.from_pretrained(tmp_path / "fp8", dtype=torch.float32, dequantize=False)
    plain = automodel_plugins.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    text = reference.config.text_config
    attention = resident.model.language_model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(attention, name), Fp8Linear), name
    assert resident.automodel_composition.fp8_not_resident == []
    for name, heads in (("q", text.num_attention_heads), ("k", text.num_key_value_heads)):
        codes = getattr(attention, f"{name}_proj").weight.view(torch.uint8)
        file = stored[f"layers.0.attention.w{name}.weight"].view(torch.uint8)
        assert torch.equal(unpermute_for_rope(codes, heads), file), name
    assert_same_logits(resident, plain, text_batch(text, labels=False))
    automodel_plugins.save_pretrained(resident, tmp_path / "out")
    assert _stored(tmp_path / "out") == _stored(tmp_path / "fp8")


def test_inspect_of_a_native_only_repo_reads_headers_and_names_params_json(
    fake_hub: Any, tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    from automodel_plugins.pipeline.load.describe import describe_checkpoint

    directory, _ = dense_native
    _shard_native(directory, tmp_path / "sharded")
    fake_hub.add_directory("mistralai/native-inspect", tmp_path / "sharded", extra={"tekken.json": b"{}"})
    fake_hub.reset_counters()
    described = describe_checkpoint("mistralai/native-inspect")
    assert described["plugin"] == "mistral3_fp8" and described["load"]["layout"] == "native"
    hub = described["hub"]
    assert hub["files_read"] == [
        "params.json",
        "consolidated.safetensors.index.json",
        "consolidated-00001-of-00002.safetensors",
        "consolidated-00002-of-00002.safetensors",
    ]
    assert set(hub["not_downloaded"]) == {"tekken.json"}
    prefix = "mistralai/native-inspect:"
    whole = {
        k[len(prefix) :] for k, n in fake_hub.bytes_served["files"].items() if k.startswith(prefix) and n
    }
    assert {"params.json", "consolidated.safetensors.index.json"} <= whole
    for shard in hub["files_read"][2:]:  # headers only, by range requests
        assert (
            fake_hub.bytes_served["files"].get(prefix + shard, 0)
            < (tmp_path / "sharded" / shard).stat().st_size
        )


def test_text_only_native_loads_with_stock_logits(tmp_path: Path) -> None:
    """A text-only native release (Devstral 2 123B's form: no ``vision_encoder``, ``yarn.apply_scale: true``)
    is a ``Ministral3ForCausalLM`` whose rotary scales attention as transformers' text-only conversion does."""
    from transformers import Ministral3ForCausalLM

    from automodel_plugins.testing.tiny_models import MINISTRAL3_TEXT_ROPE_PARAMETERS, tiny_ministral3_config

    torch.manual_seed(1)
    config = tiny_ministral3_config(rope_parameters=MINISTRAL3_TEXT_ROPE_PARAMETERS)
    reference = Ministral3ForCausalLM(config).eval()
    tensors = {}
    for name, tensor in reference.state_dict().items():
        vlm_name = (
            "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        )
        value = tensor.detach().clone()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            value = unpermute_for_rope(value, heads)
        tensors[native_key(vlm_name)] = value.contiguous()
    rope = config.rope_parameters
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "rope_theta": rope["rope_theta"],
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": config.max_position_embeddings,
        "q_lora_rank": None,
        "qk_rope_head_dim": None,
        "qk_nope_head_dim": None,
        "kv_lora_rank": None,
        "v_head_dim": None,
        "yarn": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "factor": rope["factor"],
            "apply_scale": True,
            "beta": rope["beta_fast"],
            "alpha": rope["beta_slow"],
        },
        "llama_4_scaling": {
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta": 0.1,
        },
    }
    source = tmp_path / "native"
    source.mkdir()
    (source / "params.json").write_text(json.dumps(params))
    save_file(tensors, source / "consolidated.safetensors")
    model = automodel_plugins.from_pretrained(source, dtype=torch.float32)
    assert type(model) is Ministral3ForCausalLM
    assert_same_logits(model, reference, text_batch(config, labels=False))
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert _stored(tmp_path / "out") == _stored(source)


def test_native_only_repo_loads_offline_from_the_cache(
    fake_hub: Any, tmp_path: Path, dense_native: tuple[Path, Any]
) -> None:
    directory, reference = dense_native
    _shard_native(directory, tmp_path / "sharded")
    fake_hub.add_directory("mistralai/native-offline", tmp_path / "sharded")
    automodel_plugins.from_pretrained("mistralai/native-offline", dtype=torch.float32)
    fake_hub.reset_counters()
    model = automodel_plugins.from_pretrained(
        "mistralai/native-offline", dtype=torch.float32, local_files_only=True
    )
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))
    assert not any(k.startswith("mistralai/native-offline:") for k in fake_hub.bytes_served["files"])


def test_mla_moe_native_loads_with_stock_logits(tmp_path: Path) -> None:
    """A tiny Large-3-shaped native checkpoint (MLA, a dense first layer, per-expert ``experts.E.w1/w2/w3``,
    shared experts, a Pixtral tower): written by this test from transformers' Mistral4 conversion run backwards
    (renames inverted, experts split, vision q/k back in rotary order, MLA text q/k as they are), loaded
    natively onto stock ``Mistral3ForConditionalGeneration`` with logits equal to stock holding the weights."""
    reference = tiny_mla_model()
    config, text = reference.config, reference.config.text_config
    tensors, params = (
        mla_native_tensors(reference.state_dict(), reference.config),
        mla_params_of(reference.config),
    )
    source = tmp_path / "native"
    source.mkdir()
    (source / "params.json").write_text(json.dumps(params))
    save_file(tensors, source / "consolidated.safetensors")
    model = automodel_plugins.from_pretrained(source, dtype=torch.float32)
    model.set_experts_implementation("eager")
    reference.set_experts_implementation("eager")
    assert_same_state_dict(model, reference)
    assert_same_logits(model, reference, text_batch(text, labels=False))
    assert_same_logits(model, reference, mistral3_image_batch(config, labels=False))
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert _stored(tmp_path / "out") == _stored(source)
