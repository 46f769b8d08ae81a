"""Broken checkpoints and configs: each fails with a typed exception whose message names the file, key or field."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_plugins_mistral3_fp8 import plugin
from mistral3_checkpoints import (
    Checkpoints,
    CheckpointSpec,
    assert_same_weights,
    checkpoint_tensors,
    edit_config,
    edit_tensors,
    stock_load,
)

from automodel_plugins import (
    CheckpointError,
    ConfigError,
    NoPluginClaimError,
    build_model,
    from_pretrained,
    load_weights,
)
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import (
    ConfigMismatchError,
    CorruptCheckpointError,
    DtypeMismatchError,
    MissingKeysError,
    NonFiniteWeightError,
    RotaryRepairError,
    ScaleError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnsafeCheckpointPathError,
    UnsupportedQuantizationError,
)
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.registry import Registry
from automodel_plugins.sources import load_config

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj.weight"
Q_SCALE = "language_model.model.layers.0.self_attn.q_proj.weight_scale_inv"
NORM = "language_model.model.norm.weight"
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


Damaged = Callable[..., Path]


@pytest.fixture
def damaged(checkpoints: Checkpoints, tmp_path: Path) -> Damaged:
    """``damaged(**spec_changes)``: a private copy of a generated checkpoint, to break."""

    def make(**changes: Any) -> Path:
        return checkpoints.copy(tmp_path / "damaged", CheckpointSpec(**changes))

    return make


def load(path: Path, registry: Registry, **kwargs: Any) -> Any:
    return from_pretrained(path, registry=registry, **kwargs)


# --- corrupt files ----------------------------------------------------------------------------------------


def test_truncated_shard_names_the_file(registry: Registry, damaged: Damaged) -> None:
    path = damaged(shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        load(path, registry)
    assert caught.value.path == shard.resolve() and shard.name in str(caught.value)


def test_garbage_header_names_the_file(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:24] = b"\xff" * 16
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="header") as caught:
        load(path, registry)
    assert str(file.resolve()) in str(caught.value)


def test_index_naming_a_missing_shard(registry: Registry, damaged: Damaged) -> None:
    path = damaged(shards=2)
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        load(path, registry)
    assert "model-00001-of-00002.safetensors" in str(caught.value)


# --- scales -----------------------------------------------------------------------------------------------


def test_fp8_weight_without_a_scale_names_the_weight(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.pop(Q_SCALE))
    with pytest.raises(ScaleError, match="has no scale") as caught:
        load(path, registry)
    assert caught.value.key == Q_PROJ and Q_PROJ in str(caught.value)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 0.0, -0.5], ids=["nan", "inf", "zero", "negative"]
)
@pytest.mark.parametrize("block_size", [None, (32, 32)], ids=["per-tensor", "block"])
def test_bad_scale_value_names_the_scale(
    registry: Registry, damaged: Damaged, value: float, block_size: tuple[int, int] | None
) -> None:
    path = damaged(block_size=block_size)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        scale = tensors[Q_SCALE].clone()
        scale.view(-1)[-1] = value  # the last cell of a grid, the only one of a 0-d scale
        tensors[Q_SCALE] = scale

    edit_tensors(path, poison)
    with pytest.raises(ScaleError, match="not finite and positive") as caught:
        load(path, registry)
    assert caught.value.key == Q_SCALE and Q_SCALE in str(caught.value)


@pytest.mark.parametrize("grid", [(2, 2), (2, 3), ()], ids=["too-few-cols", "too-many-cols", "0-d"])
def test_block_scale_grid_of_wrong_shape(registry: Registry, damaged: Damaged, grid: tuple[int, ...]) -> None:
    """q_proj is 64x64: with 32x32 blocks its grid must be 2x2... here 2x2 is right only for q_proj, so
    the damaged scale sits on down_proj (64x128, grid 2x4)."""
    path = damaged(block_size=(32, 32))
    key = "language_model.model.layers.1.mlp.down_proj.weight_scale_inv"
    edit_tensors(path, lambda t: t.__setitem__(key, torch.ones(grid)))
    with pytest.raises(ScaleError, match=r"grid shape|one element|block scales") as caught:
        load(path, registry)
    assert caught.value.key == key and key in str(caught.value)


def test_per_tensor_scale_with_several_elements(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.__setitem__(Q_SCALE, torch.ones(2)))
    with pytest.raises(ScaleError, match="one element") as caught:
        load(path, registry)
    assert caught.value.key == Q_SCALE


# --- tensors that do not fit the model --------------------------------------------------------------------


def test_shape_mismatch_names_the_key(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.__setitem__(NORM, torch.ones(65, dtype=torch.bfloat16)))
    with pytest.raises(ShapeMismatchError, match=r"\(65,\)") as caught:
        load(path, registry)
    assert caught.value.key == NORM and NORM in str(caught.value)


def test_fp8_shape_mismatch_names_the_key(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ][:32].contiguous()))
    with pytest.raises(ShapeMismatchError) as caught:
        load(path, registry)
    assert caught.value.key == Q_PROJ


def test_integer_tensor_where_a_float_is_expected(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.__setitem__(NORM, torch.ones(64, dtype=torch.int32)))
    with pytest.raises(DtypeMismatchError, match="int32") as caught:
        load(path, registry)
    assert caught.value.key == NORM and NORM in str(caught.value)


def test_unexpected_keys_are_listed(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    extra = ["language_model.model.layers.2.mlp.gate_proj.weight", "vision_tower.extra.bias"]
    edit_tensors(path, lambda t: t.update({k: torch.zeros(2, dtype=torch.bfloat16) for k in extra}))
    with pytest.raises(UnexpectedKeysError) as caught:
        load(path, registry)
    assert caught.value.keys == sorted(extra)
    assert all(k in str(caught.value) for k in extra)


def test_missing_keys_are_listed(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    gone = [NORM, "vision_tower.ln_pre.weight"]
    edit_tensors(path, lambda t: [t.pop(k) for k in gone])
    with pytest.raises(MissingKeysError) as caught:
        load(path, registry)
    assert len(caught.value.keys) == 2
    assert all(k in str(caught.value) for k in gone)
    assert "model.language_model.norm.weight" in str(caught.value)


def test_missing_fp8_weight_with_its_scale_left_behind(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_tensors(path, lambda t: t.pop(Q_PROJ))
    with pytest.raises(MissingKeysError, match=r"q_proj\.weight"):
        load(path, registry)


# --- paths and files outside the checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_entry_outside_the_directory(registry: Registry, damaged: Damaged, entry: str) -> None:
    path = damaged(shards=2)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][NORM] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(UnsafeCheckpointPathError) as caught:
        load(path, registry)
    assert caught.value.key == NORM and entry in str(caught.value) and index.name in str(caught.value)


def test_symlinked_shard_escaping_the_directory(registry: Registry, damaged: Damaged, tmp_path: Path) -> None:
    path = damaged(shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(UnsafeCheckpointPathError, match="outside the checkpoint directory"):
        load(path, registry)


class _Trap:
    """Unpickling this writes a marker file: proof that something executed pickle data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled"))


def test_the_trap_fires_when_unpickled(tmp_path: Path) -> None:
    """Guards the two tests below: unpickling the trap does write its marker."""
    marker = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Trap(marker)))
    assert marker.read_text() == "unpickled"


def test_pickles_in_the_directory_are_never_loaded(
    registry: Registry, checkpoints: Checkpoints, damaged: Damaged
) -> None:
    path = damaged()
    marker = path.parent / "UNPICKLED"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (path / name).write_bytes(pickle.dumps(_Trap(marker)))
    model = load(path, registry)
    assert not marker.exists()
    assert_same_weights(model, load(checkpoints(), registry))


def test_pickle_only_directory_is_refused_without_unpickling(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    marker = path.parent / "UNPICKLED"
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors file") as caught:
        load(path, registry)
    assert str(path) in str(caught.value) and not marker.exists()


def test_remote_code_in_config_is_not_run(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    marker = path.parent / "REMOTE_CODE_RAN"
    (path / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    edit_config(path, lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    load(path, registry)
    assert not marker.exists()


# --- configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"model_type": "mistral3",', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "model_type"),
    ],
    ids=["truncated-json", "array", "no-model-type"],
)
def test_malformed_config_names_the_file(
    registry: Registry, damaged: Damaged, content: str, match: str
) -> None:
    path = damaged()
    (path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=match) as caught:
        load(path, registry)
    assert caught.value.path == path / "config.json" and str(path / "config.json") in str(caught.value)


def test_unknown_text_model_type_names_the_field(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_config(path, lambda c: c["text_config"].update(model_type="ministral9"))
    with pytest.raises(ConfigError, match=r"text_config\.model_type") as caught:
        load(path, registry)
    assert "ministral3" in str(caught.value)  # the did-you-mean hint


@pytest.mark.parametrize(
    "quantization",
    [{"weight_block_size": [0, 128]}, {"weight_block_size": [128]}, {"activation_scheme": "sometimes"}],
    ids=["zero-block", "one-dim-block", "bad-scheme"],
)
def test_invalid_fp8_fields_name_the_field(
    registry: Registry, damaged: Damaged, quantization: dict[str, Any]
) -> None:
    path = damaged()
    edit_config(path, lambda c: c["quantization_config"].update(quantization))
    field = next(iter(quantization))
    with pytest.raises(UnsupportedQuantizationError) as caught:
        load(path, registry)
    assert f"quantization_config.{field}" in str(caught.value)
    assert "plugin 'mistral3_fp8'" in " ".join(caught.value.__notes__)


# --- quantization methods the plugin does not handle ------------------------------------------------------


@pytest.fixture
def awq_checkpoint(damaged: Damaged) -> Path:
    """A Mistral3 checkpoint whose config declares AWQ (the tensors are irrelevant: it must never be planned)."""
    path = damaged(quantized=False)
    edit_config(path, lambda c: c.update(quantization_config=dict(AWQ)))
    return path


def test_awq_with_require_plugin_raises_no_plugin_claim(registry: Registry, awq_checkpoint: Path) -> None:
    with pytest.raises(NoPluginClaimError, match="mistral3"):
        load(awq_checkpoint, registry, require_plugin=True)


def test_adapter_hook_refuses_awq_naming_the_field(awq_checkpoint: Path) -> None:
    """The hook contract: asked directly about a config it would not claim, the adapter refuses by name."""
    with Checkpoint.open(awq_checkpoint) as checkpoint, pytest.raises(UnsupportedQuantizationError) as caught:
        plugin.state_dict_adapter(config=load_config(awq_checkpoint), checkpoint=checkpoint)
    assert "quantization_config.quant_method" in str(caught.value) and "awq" in str(caught.value)


def test_load_weights_of_an_awq_checkpoint_refuses_naming_the_field(
    registry: Registry, checkpoints: Checkpoints, awq_checkpoint: Path
) -> None:
    """``load_weights`` reads the checkpoint's own config: its AWQ declaration is refused by the plugin's
    adapter (a typed error passes through the hook unwrapped, with a note naming plugin and hook) before any
    tensor is planned, instead of a MissingKeysError that hides the reason."""
    model = build_model(checkpoints(), registry=registry)
    model.to_empty(device="cpu")
    with pytest.raises(UnsupportedQuantizationError) as caught:
        load_weights(model, awq_checkpoint, registry=registry)
    assert "quantization_config.quant_method" in str(caught.value) and "'awq'" in str(caught.value)


# --- values that would load as NaN or inf (issue 11) ------------------------------------------------------


def poke_bytes(path: Path, key: str, value: int, positions: tuple[int, ...] = (0,)) -> None:
    """Set bytes of the fp8 tensor ``key`` (flat positions) to ``value``: a NaN code, say."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        raw = tensors[key].view(torch.uint8).clone()
        raw.view(-1)[list(positions)] = value
        tensors[key] = raw.view(tensors[key].dtype)

    edit_tensors(path, edit)


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8-resident"])
@pytest.mark.parametrize("code", [0x7F, 0xFF], ids=["nan", "negative-nan"])
@pytest.mark.parametrize("block_size", [None, (32, 32)], ids=["per-tensor", "block"])
def test_fp8_nan_code_is_refused_naming_file_and_key(
    registry: Registry, damaged: Damaged, code: int, block_size: tuple[int, int] | None, dequantize: bool
) -> None:
    """Also when the weight stays FP8 (``dequantize=False``): every forward would dequantize it to NaN."""
    path = damaged(block_size=block_size)
    poke_bytes(path, Q_PROJ, code, positions=(70,))  # row 1, col 6 of the 64-wide weight
    with pytest.raises(
        NonFiniteWeightError, match=rf"at \(1, 6\) is nan: stored byte {code:#04x} is a NaN code"
    ) as caught:
        load(path, registry, dequantize=dequantize)
    assert caught.value.key == Q_PROJ and caught.value.path == (path / "model.safetensors").resolve()


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8-resident"])
@pytest.mark.parametrize("block_size", [None, (32, 32)], ids=["per-tensor", "block"])
def test_finite_scale_that_overflows_is_refused(
    registry: Registry, damaged: Damaged, block_size: tuple[int, int] | None, dequantize: bool
) -> None:
    """3e38 is finite and positive (the scale check passes), but any stored value above 1 times it is inf."""
    path = damaged(block_size=block_size)

    def huge_scale(tensors: dict[str, torch.Tensor]) -> None:
        scale = tensors[Q_SCALE].clone()
        scale.view(-1)[-1] = 3e38  # the only cell of a 0-d scale; the bottom-right block of a grid
        tensors[Q_SCALE] = scale

    edit_tensors(path, huge_scale)
    with pytest.raises(NonFiniteWeightError, match=r"times scale 3e\+38 overflows bfloat16") as caught:
        load(path, registry, dequantize=dequantize)
    assert caught.value.key == Q_PROJ and "model.safetensors" in str(caught.value)


def test_scale_that_overflows_only_the_requested_dtype(
    registry: Registry, damaged: Damaged, checkpoints: Checkpoints
) -> None:
    """448 x 200 fits BF16 (the load is exact) but not FP16's 65504: refused for dtype=float16 only."""
    path = damaged()

    def scale_200(tensors: dict[str, torch.Tensor]) -> None:
        tensors[Q_SCALE] = torch.tensor(200.0)

    edit_tensors(path, scale_200)
    model = load(path, registry)
    assert_same_weights(model, stock_load(path, dtype=torch.bfloat16))
    with pytest.raises(NonFiniteWeightError, match="overflows float16") as caught:
        load(path, registry, dtype=torch.float16)
    assert caught.value.key == Q_PROJ


def relabel_dtype(file: Path, key: str, dtype: str) -> None:
    """Rewrite the header's dtype of ``key`` (same length, same bytes): F8_E4M3 data labelled F8_E5M2."""
    data = bytearray(file.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    assert len(header[key]["dtype"]) == len(dtype)
    header[key]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    data[8 : 8 + length] = raw
    file.write_bytes(bytes(data))


def test_fp8_format_other_than_the_config_declares(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    relabel_dtype(path / "model.safetensors", Q_PROJ, "F8_E5M2")
    with pytest.raises(
        DtypeMismatchError,
        match=r"float8_e5m2 but the config's quantization_config declares torch\.float8_e4m3fn",
    ) as caught:
        load(path, registry)
    assert caught.value.key == Q_PROJ


def test_bf16_weight_where_fp8_is_expected(registry: Registry, damaged: Damaged) -> None:
    """Its scale beside it says FP8 was meant: said so, rather than "1 checkpoint tensor the model does not use"."""
    path = damaged()
    bf16 = checkpoint_tensors(path)[Q_PROJ].float() * 0.01  # any BF16 values
    edit_tensors(path, lambda t: t.__setitem__(Q_PROJ, bf16.to(torch.bfloat16)))
    with pytest.raises(DtypeMismatchError, match=r"stored as torch\.bfloat16 but its FP8 scale") as caught:
        load(path, registry)
    assert caught.value.key == Q_PROJ and Q_SCALE in str(caught.value)


def test_two_scale_names_name_the_file(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    other = Q_SCALE.replace("weight_scale_inv", "weight_scale")
    edit_tensors(path, lambda t: t.__setitem__(other, t[Q_SCALE].clone()))
    with pytest.raises(ScaleError, match="several scales") as caught:
        load(path, registry)
    assert caught.value.path == (path / "model.safetensors").resolve()


def test_unsupported_quantization_errors_name_the_config_file(registry: Registry, damaged: Damaged) -> None:
    path = damaged()
    edit_config(path, lambda c: c["quantization_config"].update(weight_block_size=[0, 128]))
    with pytest.raises(UnsupportedQuantizationError) as caught:
        load(path, registry)
    assert caught.value.path == path.resolve() / "config.json"


# --- rotary tables and structure the checkpoint does not hold (issue 11) ----------------------------------


def test_rope_factor_zero_is_refused_naming_the_field(registry: Registry, damaged: Damaged) -> None:
    """Stock transformers loads this with NaN and inf in inv_freq and no error."""
    path = damaged()
    edit_config(path, lambda c: c["text_config"]["rope_parameters"].update(factor=0))
    with pytest.raises(
        ConfigError, match=r"text_config\.rope_parameters\.factor: .*greater than 0"
    ) as caught:
        load(path, registry)
    assert caught.value.path == path / "config.json"


def test_non_finite_rotary_buffers_are_refused_naming_module_and_field(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """A config object built in Python skips the config.json checks: the rotary repair refuses what it gives, as
    soon as the buffers are real (the rotary modules recompute in their own ``_apply``, so at ``to_empty``)."""
    path = checkpoints()
    config = load_config(path)
    config.text_config.rope_parameters["factor"] = 0.0
    model = build_model(config, registry=registry)
    with pytest.raises(RotaryRepairError, match=r"'model\.language_model\.rotary_emb'.*NaN/inf") as caught:
        model.to_empty(device="cpu")
        load_weights(model, path, registry=registry)
    assert "rope_parameters.factor = 0.0" in str(caught.value)


@pytest.mark.parametrize("layout", ["legacy", "runtime"])
@pytest.mark.parametrize("field", ["text_config", "vision_config"])
def test_huge_layer_count_fails_before_the_model_is_built(
    registry: Registry, damaged: Damaged, monkeypatch: pytest.MonkeyPatch, layout: str, field: str
) -> None:
    """10**6 layers: >120 s and >4 GB of meta modules before any check, in both key layouts."""
    path = damaged(layout=layout)
    edit_config(path, lambda c: c[field].update(num_hidden_layers=10**6))

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built before the config was checked against the headers")

    monkeypatch.setattr("automodel_plugins.pipeline.load.load.build_on_meta", never)
    monkeypatch.setattr("automodel_plugins.pipeline.load.describe.build_model", never)
    for attempt in (lambda: load(path, registry), lambda: describe_checkpoint(path, registry=registry)):
        with pytest.raises(ConfigMismatchError, match=rf"{field}\.num_hidden_layers is 1000000") as caught:
            attempt()
        prefix = "language_model.model.layers" if layout == "legacy" else "model.language_model.layers"
        assert f"{prefix}: 2" in str(caught.value)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (
            lambda p: edit_tensors(p, lambda t: t.__setitem__(NORM, torch.ones(65, dtype=torch.bfloat16))),
            ShapeMismatchError,
        ),
        (
            lambda p: edit_tensors(p, lambda t: t.__setitem__(NORM, torch.ones(64, dtype=torch.int32))),
            DtypeMismatchError,
        ),
        (lambda p: edit_tensors(p, lambda t: t.__setitem__(Q_SCALE, torch.ones(2))), ScaleError),
        (
            lambda p: edit_tensors(p, lambda t: t.__setitem__(Q_SCALE, torch.tensor(1, dtype=torch.int32))),
            ScaleError,
        ),
        (lambda p: edit_config(p, lambda c: c["text_config"].update(vocab_size=10**12)), ConfigMismatchError),
        (lambda p: relabel_dtype(p / "model.safetensors", Q_PROJ, "F8_E5M2"), DtypeMismatchError),
    ],
    ids=["shape", "int32-norm", "scale-shape", "scale-dtype", "vocab-1e12", "fp8-format"],
)
def test_inspect_raises_what_the_load_raises_from_headers_alone(
    registry: Registry,
    damaged: Damaged,
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[Path], None],
    error: type,
) -> None:
    """``inspect`` used to report these as planned loads (vocab 10**12 as 256 TB after load)."""
    path = damaged()
    damage(path)
    with pytest.raises(error) as loading:
        load(path, registry)
    for method in ("read", "tensor", "slice"):  # inspect reads no tensor data
        monkeypatch.setattr(Checkpoint, method, lambda *a, **k: pytest.fail("tensor data read"))
    with pytest.raises(error) as inspecting:
        describe_checkpoint(path, registry=registry)
    assert str(inspecting.value) == str(loading.value)
