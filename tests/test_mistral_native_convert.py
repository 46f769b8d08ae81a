"""``convert --layout native``: Mistral's native form written from transformers' form (and back), streaming, in
BF16 or FP8, and a native model saved after training.

References are independent of the host: the tiny models' own state dicts mapped to native names by the tests'
writer (transformers' Mistral4 conversion run backwards, ``tests/mistral_native_checkpoints.py``), the source
files' own FP8 codes and scales, and the real Large 3 ``params.json``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import reference_state_dict, stored_tensors, write_checkpoint
from mistral_native_checkpoints import (
    mla_model,
    mla_native_tensors,
    mla_params_of,
    native_tensors,
    params_of,
    write_fp8_native,
)
from safetensors.torch import save_file
from transformers import AutoConfig, Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.errors import NoNativeLayoutError, SaveOptionError
from automodel_plugins.pipeline.save.convert import convert_checkpoint
from automodel_plugins.pipeline.save.native import native_quantization
from automodel_plugins.pipeline.save.plan import SaveFormat
from automodel_plugins.sources.native import translate_params
from automodel_plugins.sources.native_params import params_from_config
from automodel_plugins.testing.tiny_models import tiny_mistral3_config

pytestmark = pytest.mark.filterwarnings("ignore:.*partial:UserWarning")

LARGE_3_PARAMS = Path("/work/shared/reference/data/mistral-large-3-675b-instruct-2512.params.json")
BLOCK = (16, 16)
_FP8 = re.compile(r"\.(weight_scale|qscale_weight)$")


@pytest.fixture(scope="module")
def mla(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model and its HF-form checkpoints (legacy keys) in every form ``mistral4_checkpoints`` writes."""
    model = mla_model()
    root = tmp_path_factory.mktemp("mla")
    forms = {
        form: write_checkpoint(model, root / form, form)
        for form in ("per-tensor", "block-per-expert", "block-fused", "bf16")
    }
    return {"model": model, "forms": forms}


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- params.json <-> config ------------------------------------------------------------------------------------


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_large3_params_round_trip_through_the_config() -> None:
    """params.json -> config -> params.json: every field as published (key order included) but the trainer's
    expert-parallel hints, which say nothing about the model; and the config built from either is the same."""
    published = json.loads(LARGE_3_PARAMS.read_text())
    data = translate_params(published)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    back = params_from_config(config)
    expected = {k: v for k, v in published.items() if k != "quantization_config"}
    expected["moe"] = {
        k: v for k, v in expected["moe"].items() if k not in ("expert_parallel", "expert_model_parallel")
    }
    assert back == expected and list(back) == list(expected)
    again = translate_params(back)
    rebuilt = AutoConfig.for_model(again.pop("model_type"), **again).to_dict()
    original = config.to_dict()
    original.pop("quantization_config")
    assert rebuilt == original


@pytest.mark.skipif(not LARGE_3_PARAMS.is_file(), reason="the real params.json is not on this machine")
def test_fp8_block_declares_large3s_quantization_config() -> None:
    """``--to fp8-block`` of a Large-3-shaped model declares the published compressed-tensors dict (all but the
    tool's version stamp), which the forward translation reads as the same FP8 config."""
    published = json.loads(LARGE_3_PARAMS.read_text())["quantization_config"]
    written = native_quantization(SaveFormat.parse("fp8-block"), mla=True, vlm=True)["quantization_config"]
    assert written == {k: v for k, v in published.items() if k != "version"}
    assert json.dumps(written) == json.dumps({k: v for k, v in published.items() if k != "version"})


def test_mla_params_are_what_a_release_carries(mla: dict[str, Any]) -> None:
    config = mla["model"].config
    assert params_from_config(config) == mla_params_of(config)


# --- HF form -> native, every form and --to --------------------------------------------------------------------

_EXPERT_PIECE = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"
)
_W = {"gate": "w1", "down": "w2", "up": "w3"}


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A scale broadcast over its weight: 0-d as is, a ``BLOCK`` grid repeated over its (maybe partial) blocks."""
    scale = scale.float()
    if scale.dim() == 0:
        return scale
    return scale.repeat_interleave(BLOCK[0], 0)[: shape[0]].repeat_interleave(BLOCK[1], 1)[:, : shape[1]]


def source_fp8(directory: Path, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The HF-form source's own FP8 codes and scales under native names (per-expert pieces renamed, a fused
    tensor split per expert with that expert's ``[E, 1, 1]`` scale), read from its files here."""
    stored = stored_tensors(directory)
    runtime = {
        re.sub(r"^model\.language_model\.", "language_model.model.", name): name
        for name in model.state_dict()
    }
    codes: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        if value.dtype != torch.float8_e4m3fn:
            continue
        scale = stored[
            key.removesuffix("weight") + "weight_scale_inv" if key.endswith("weight") else key + "_scale_inv"
        ]
        piece = _EXPERT_PIECE.match(key)
        if piece is not None:
            n, e, w = piece.groups()
            codes[f"layers.{n}.experts.{e}.{_W[w]}.weight"] = value
            scales[f"layers.{n}.experts.{e}.{_W[w]}.weight"] = scale
            continue
        for native, part in mla_native_tensors({runtime[key]: value}, model.config).items():
            codes[native] = part
            expert = re.search(r"\.experts\.(\d+)\.", native)
            scales[native] = (
                scale[int(expert[1])].reshape(())
                if expert and scale.dim() == 3 and scale.shape[1:] == (1, 1)
                else scale
            )
    return codes, scales


CASES = [
    (form, to)
    for form in ("per-tensor", "block-per-expert", "block-fused", "bf16")
    for to in ("bf16", "fp8-tensor", "fp8-block")
]
EXACT = {("per-tensor", "fp8-tensor"), ("block-per-expert", "fp8-block")}
"""FP8 in, FP8 out at the source's granularity: the source's codes and scales, byte for byte."""


@pytest.mark.parametrize(("form", "to"), CASES, ids=[f"{f}-to-{t}" for f, t in CASES])
def test_hf_to_native_is_the_reference_in_native_names(
    mla: dict[str, Any], tmp_path: Path, form: str, to: str
) -> None:
    model, source = mla["model"], mla["forms"][form]
    out = tmp_path / "native"
    report = convert_checkpoint(
        source, out, to=to, layout="native", block_size=BLOCK if to == "fp8-block" else None
    )
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    params = json.loads((out / "params.json").read_text())
    quantization = native_quantization(
        SaveFormat.parse("none" if to == "bf16" else to, block_size=BLOCK if to == "fp8-block" else None),
        mla=True,
        vlm=True,
    )
    assert params == {**mla_params_of(model.config), **quantization}
    # The independent reference: the source dequantized here, mapped by the tests' own writer, in BF16.
    reference = mla_native_tensors(reference_state_dict(source, torch.bfloat16), model.config)
    written = stored_tensors(out)
    fp8 = {key for key, value in written.items() if value.dtype == torch.float8_e4m3fn}
    weights = {key for key in written if not _FP8.search(key)}
    assert weights == set(reference)
    for key in weights - fp8:
        assert _raw(written[key]) == _raw(reference[key]), key
    if to == "bf16":
        assert not fp8 and report.quantized == 0
        return
    scale_name = "weight_scale" if to == "fp8-block" else "qscale_weight"
    text_linears = {
        key
        for key in reference
        if key.startswith("layers.") and reference[key].dim() == 2 and "norm" not in key
    } - {key for key in reference if key.endswith(".gate.weight")}
    if to == "fp8-block":  # Large 3's ignore list keeps these BF16
        text_linears -= {k for k in reference if k.endswith(("wq_a.weight", "wkv_a_with_mqa.weight"))}
    assert fp8 == text_linears and report.quantized == len(fp8)
    for key in fp8:
        scale = written[key.removesuffix("weight") + scale_name]
        value = written[key].float() * _expand(scale, written[key].shape)
        want = reference[key].float()
        step = want.abs() * 2**-3 + _expand(scale, written[key].shape) * 2**-9
        assert ((value - want).abs() <= step).all(), key
    if (form, to) in EXACT:
        codes, scales = source_fp8(source, model)
        kept = {k for k in codes if k in fp8}
        assert kept == fp8 and report.scales_kept == len(fp8)
        for key in kept:
            assert _raw(written[key]) == _raw(codes[key]), key
            assert _raw(written[key.removesuffix("weight") + scale_name]) == _raw(scales[key]), key
    # Read back by the host: the values a hand dequantization of the written files gives.
    loaded = automodel_plugins.from_pretrained(out, dtype=torch.bfloat16)
    again = mla_native_tensors(loaded.state_dict(), model.config)
    for key in fp8:
        scale = written[key.removesuffix("weight") + scale_name]
        by_hand = (written[key].float() * _expand(scale, written[key].shape)).to(torch.bfloat16)
        assert torch.equal(again[key], by_hand), key


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Ministral 3 VLM in native form, BF16 and Mistral's own per-tensor FP8 (the tests' writer)."""
    torch.manual_seed(0)
    config = tiny_mistral3_config(vision={"hidden_act": "silu"})
    reference = Mistral3ForConditionalGeneration(config).to(torch.bfloat16).eval()  # what convert writes
    root = tmp_path_factory.mktemp("dense")
    bf16 = root / "bf16"
    bf16.mkdir()
    (bf16 / "params.json").write_text(json.dumps(params_of(reference.config)))
    save_file(native_tensors(reference), bf16 / "consolidated.safetensors")
    write_fp8_native(bf16, reference, root / "fp8")
    return {"reference": reference, "bf16": bf16, "fp8": root / "fp8"}


@pytest.mark.parametrize(("form", "to"), [("bf16", "bf16"), ("fp8", "fp8-tensor")])
def test_native_to_hf_to_native_gives_the_source_bytes(
    dense: dict[str, Any], tmp_path: Path, form: str, to: str
) -> None:
    """Native -> HF -> native: every tensor byte-identical to the source (q/k permuted into transformers'
    order and back, FP8 codes and scales kept), but Mistral's static activation scales, which transformers'
    FP8 format does not carry (dynamic activations, declared so)."""
    source = dense[form]
    convert_checkpoint(source, tmp_path / "hf", to=to)
    assert (tmp_path / "hf" / "config.json").is_file()
    convert_checkpoint(tmp_path / "hf", tmp_path / "native", to=to, layout="native")
    original, back = stored_tensors(source), stored_tensors(tmp_path / "native")
    assert sorted(back) == sorted(k for k in original if not k.endswith("qscale_act"))
    for key, value in back.items():
        assert value.dtype == original[key].dtype and _raw(value) == _raw(original[key]), key
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    published = json.loads((source / "params.json").read_text())
    if form == "fp8":
        assert params.pop("quantization") == {"qformat_weight": "fp8_e4m3", "qscheme_act": "NO_SCALES"}
        published.pop("quantization")
    assert params == published


def test_mla_native_hf_native_keeps_every_tensor_but_the_refused_experts(
    mla: dict[str, Any], tmp_path: Path
) -> None:
    """Small 4's HF form -> native (n1) -> HF -> native (n2): every tensor of n2 is n1's byte for byte, but
    the experts: transformers' FP8 format quantizes ``nn.Linear`` weights only, so the fused experts cross the
    HF form in BF16 (exactly n1's values) and come back with scales of their own (``amax / 448`` per expert
    matrix, where n1 kept Small 4's one scale shared by gate and up): within one FP8 step of n1's values."""
    source = mla["forms"]["per-tensor"]
    convert_checkpoint(source, tmp_path / "n1", to="fp8-tensor", layout="native")
    convert_checkpoint(tmp_path / "n1", tmp_path / "hf", to="fp8-tensor")
    convert_checkpoint(tmp_path / "hf", tmp_path / "n2", to="fp8-tensor", layout="native")
    first, second = stored_tensors(tmp_path / "n1"), stored_tensors(tmp_path / "n2")
    assert sorted(first) == sorted(second)
    experts = {k for k in first if ".experts." in k}
    assert experts and all(_raw(first[k]) == _raw(second[k]) for k in first if k not in experts)
    for key in (k for k in experts if k.endswith(".weight")):
        scale = key.removesuffix("weight") + "qscale_weight"
        want = first[key].float() * first[scale].float()
        got = second[key].float() * second[scale].float()
        assert ((got - want).abs() <= want.abs() * 2**-3 + second[scale].float() * 2**-9).all(), key
    assert (tmp_path / "n1" / "params.json").read_bytes() == (tmp_path / "n2" / "params.json").read_bytes()


def test_native_to_native_fp8_keeps_the_source_and_requantizes_in_blocks(
    dense: dict[str, Any], tmp_path: Path
) -> None:
    """A native source in native form again: ``--to fp8-tensor`` keeps Mistral's own bytes (q/k included, read
    in transformers' order and permuted back); ``--to fp8-block`` writes ``weight_scale`` grids of the stored
    (rotary-order) rows, each value within one FP8 step of the source's."""
    source = dense["fp8"]
    original = stored_tensors(source)
    convert_checkpoint(source, tmp_path / "tensor", to="fp8-tensor", layout="native")
    kept = stored_tensors(tmp_path / "tensor")
    assert all(_raw(kept[k]) == _raw(original[k]) for k in kept)
    convert_checkpoint(source, tmp_path / "block", to="fp8-block", layout="native", block_size=BLOCK)
    blocks = stored_tensors(tmp_path / "block")
    key = "layers.0.attention.wq.weight"
    grid = blocks["layers.0.attention.wq.weight_scale"]
    assert blocks[key].dtype == torch.float8_e4m3fn and grid.dtype == torch.bfloat16
    want = original[key].float() * original["layers.0.attention.wq.qscale_weight"].float()
    got = blocks[key].float() * _expand(grid, blocks[key].shape)
    assert ((got - want).abs() <= want.abs() * 2**-3 + _expand(grid, blocks[key].shape) * 2**-9).all()
    params = json.loads((tmp_path / "block" / "params.json").read_text())
    assert "quantization" not in params
    assert params["quantization_config"]["config_groups"]["FP8_BLOCK"]["weights"]["block_structure"] == [
        16,
        16,
    ]
    assert params["quantization_config"]["ignore"] == [
        "model.embed_tokens",
        "re:patch_merger.*",
        "re:vision_encoder.*",
        "re:vision_language_adapter.*",
        "lm_head",
    ]


# --- streaming -------------------------------------------------------------------------------------------------


def test_hf_to_native_streams_a_chunk_of_rows_at_a_time(
    mla: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of ~1000 elements no read is bigger than a chunk (or one row: one expert's matrix of a fused
    tensor), each expert's piece reads its own expert only, and the files are those of the default chunking."""
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.save import values as save_values

    source = mla["forms"]["per-tensor"]
    from automodel_plugins.pipeline.save import write as save_write

    monkeypatch.setattr(save_values, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(save_write, "CHUNK_ELEMENTS", 1000)
    largest = {"elements": 0, "bytes": 0}
    real_read = Checkpoint.read

    def read(self: Checkpoint, key: str, region: Any = None) -> torch.Tensor:
        tensor = real_read(self, key, region)
        largest["elements"] = max(largest["elements"], tensor.numel())
        largest["bytes"] += tensor.numel() * tensor.element_size() if ".experts." in key else 0
        return tensor

    monkeypatch.setattr(Checkpoint, "read", read)
    convert_checkpoint(source, tmp_path / "small", to="fp8-tensor", layout="native")
    with Checkpoint.open(source) as checkpoint:
        row = max(math.prod(checkpoint.info(k).shape[1:]) for k in checkpoint if checkpoint.info(k).shape)
        expert_bytes = sum(
            checkpoint.info(k).nbytes
            for k in checkpoint
            if ".experts." in k and k.endswith(("proj", "_scale_inv"))
        )
    assert 0 < largest["elements"] <= max(4 * 1000, row)  # per-tensor FP8 encodes 4 chunks at once
    # Each pass (amax, write) reads each piece's own rows (the gate and the up half of an expert's matrix,
    # its grid with each), never the whole fused tensor per piece (which is 4 experts x 12 pieces x 2 passes
    # here); the exact counts are in tests/test_convert_region_reads.py.
    assert largest["bytes"] <= 2 * 1.05 * expert_bytes
    monkeypatch.undo()
    convert_checkpoint(source, tmp_path / "default", to="fp8-tensor", layout="native")
    assert (tmp_path / "small" / "consolidated.safetensors").read_bytes() == (
        tmp_path / "default" / "consolidated.safetensors"
    ).read_bytes()


# --- bad input -------------------------------------------------------------------------------------------------


def test_native_layout_of_a_non_mistral_model_names_the_model(tmp_path: Path, run_cli: Any) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_config

    Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config()).save_pretrained(tmp_path / "qwen")
    with pytest.raises(NoNativeLayoutError, match=r"model type 'qwen3_vl' has no Mistral-native form"):
        convert_checkpoint(tmp_path / "qwen", tmp_path / "out", to="bf16", layout="native")
    result = run_cli(
        "convert", str(tmp_path / "qwen"), str(tmp_path / "out"), "--to", "bf16", "--layout", "native"
    )
    assert result.returncode == 2 and "qwen3_vl" in result.stderr and "--layout hf" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.text_config.rope_parameters.update(mscale_all_dim=0.5), "rope_parameters.mscale"),
        (lambda c: setattr(c.vision_config, "hidden_act", "gelu"), "vision_config.hidden_act"),
        (lambda c: setattr(c.text_config, "norm_topk_prob", False), "norm_topk_prob"),
        (lambda c: c.text_config.rope_parameters.update(rope_type="linear"), "rope_parameters.rope_type"),
    ],
)
def test_a_config_the_native_format_cannot_say_is_refused_by_field(edit: Any, field: str) -> None:
    config = mla_model().config
    edit(config)
    with pytest.raises(NoNativeLayoutError, match=re.escape(repr(field))):
        params_from_config(config)


def test_native_layout_options_are_checked(mla: dict[str, Any], tmp_path: Path) -> None:
    source = mla["forms"]["bf16"]
    with pytest.raises(SaveOptionError, match=r"--layout"):
        convert_checkpoint(source, tmp_path / "out", to="bf16", layout="gguf")
    with pytest.raises(SaveOptionError, match=r"--not-convert"):
        convert_checkpoint(
            source, tmp_path / "out", to="fp8-tensor", layout="native", modules_to_not_convert=["lm_head"]
        )
    assert not (tmp_path / "out").exists()


# --- native in, trained, native out ---------------------------------------------------------------------------


def test_source_save_after_training_rescales_only_what_moved(dense: dict[str, Any], tmp_path: Path) -> None:
    """A native FP8 model trained a little: one weight grown past its scale (fresh ``qscale_weight``), one
    q projection (rows in rotary order) nudged inside its scale (new codes, the source scale), the rest
    untouched (the source's bytes). Re-loaded by this project, every weight is within one FP8 step of the
    trained one."""
    source = dense["fp8"]
    model = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16)
    grown = "model.language_model.layers.1.mlp.up_proj.weight"
    nudged = "model.language_model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        model.get_parameter(grown).mul_(3.0)
        q = model.get_parameter(nudged)
        q.add_(torch.randn_like(q) * q.abs().max() * 0.01).clamp_(-q.abs().max(), q.abs().max())
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert (report.scales_fresh, report.scales_kept) == (1, report.quantized - 1)
    original, saved = stored_tensors(source), stored_tensors(tmp_path / "out")
    assert sorted(saved) == sorted(original)
    moved = {
        "layers.1.feed_forward.w3.weight",
        "layers.1.feed_forward.w3.qscale_weight",
        "layers.0.attention.wq.weight",
    }
    assert all(_raw(saved[k]) == _raw(original[k]) for k in original if k not in moved)
    assert _raw(saved["layers.0.attention.wq.qscale_weight"]) == _raw(
        original["layers.0.attention.wq.qscale_weight"]
    )
    assert _raw(saved["layers.0.attention.wq.weight"]) != _raw(original["layers.0.attention.wq.weight"])
    fresh = saved["layers.1.feed_forward.w3.qscale_weight"]
    assert torch.equal(fresh, trained[grown].float().abs().max() / 448.0)
    again = automodel_plugins.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    for name, value in trained.items():
        step = value.float().abs() * 2**-3 + 1e-6
        assert ((again[name].float() - value.float()).abs() <= step).all(), name


def test_text_only_hf_to_native_loads_with_stock_logits(tmp_path: Path) -> None:
    """Devstral 2's class (``Ministral3ForCausalLM``, YaRN spelled ``mscale`` 1 / ``mscale_all_dim`` 0 as
    transformers' text-only converter writes it, ``yarn.apply_scale: true``) -> native -> loaded: stock logits."""
    from transformers import Ministral3ForCausalLM

    from automodel_plugins.testing.compare import assert_same_logits
    from automodel_plugins.testing.tiny_models import (
        MINISTRAL3_TEXT_ROPE_PARAMETERS,
        text_batch,
        tiny_ministral3_config,
    )

    torch.manual_seed(1)
    config = tiny_ministral3_config(rope_parameters=MINISTRAL3_TEXT_ROPE_PARAMETERS)
    reference = Ministral3ForCausalLM(config).eval()
    with torch.no_grad():  # values BF16 holds exactly (convert writes BF16); the rotary buffers stay fp32
        for param in reference.parameters():
            param.copy_(param.to(torch.bfloat16))
    reference.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "native", to="bf16", layout="native")
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert "vision_encoder" not in params and params["yarn"]["apply_scale"] is True
    model = automodel_plugins.from_pretrained(tmp_path / "native", dtype=torch.float32)
    assert type(model) is Ministral3ForCausalLM
    assert_same_logits(model, reference, text_batch(config, labels=False))
