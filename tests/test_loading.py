"""The streaming loader: key accounting, shape and dtype checks, meta -> assign and copy-in, and
``Checkpoint.read`` regions (the pread copy every dequantized or sharded tensor goes through)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from automodel_plugins import fp8
from automodel_plugins.adapters import Fp8StateDictAdapter, PrefixRename, StateDictAdapter, TensorSource
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import (
    CheckpointError,
    DtypeMismatchError,
    MissingKeysError,
    ScaleError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from automodel_plugins.model.tensors import ensure_materialized, model_tensors
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.load.stream import stream_into
from automodel_plugins.pipeline.readers import read_value

# --- a tiny model and its checkpoints ---------------------------------------------------------------------


class Tiny(nn.Module):
    """Two FP8-able Linears, a norm, a tied head, a persistent int buffer and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.up = nn.Linear(8, 20, bias=False)
        self.down = nn.Linear(20, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(3, dtype=torch.int64))
        self.register_buffer("cache", torch.ones(4), persistent=False)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


FP8_WEIGHTS = ("up.weight", "down.weight")


def write(directory: Path, model: nn.Module, *, prefix: str = "", extra: dict | None = None, drop=()) -> Path:
    """``model``'s tensors under ``prefix``; ``up``/``down`` weights as per-tensor FP8 with scale and
    activation scale; everything else in bf16 (int buffers as they are)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model_tensors(model).items():
        key = prefix + name
        if name in FP8_WEIGHTS:
            weight, scale = fp8.quantize(tensor.detach().float())
            tensors[key] = weight
            tensors[key.removesuffix("weight") + "weight_scale_inv"] = scale
            tensors[key.removesuffix("weight") + "activation_scale"] = torch.tensor(1.0)
        else:
            value = tensor.detach()
            tensors[key] = value.to(torch.bfloat16) if value.is_floating_point() else value
    for key in drop:
        del tensors[key]
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


def expected_value(checkpoint: Checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The dequant reference computed here: ``(w.float() * scale.float()).to(dtype)``."""
    stored = checkpoint.read(key)
    if stored.dtype == torch.float8_e4m3fn:
        scale = checkpoint.read(key.removesuffix("weight") + "weight_scale_inv")
        return (stored.float() * scale.float()).to(dtype)
    return stored.to(dtype) if stored.is_floating_point() else stored


def meta_tiny() -> Tiny:
    with torch.device("meta"):
        return Tiny()


# --- key accounting ---------------------------------------------------------------------------------------


def test_model_tensors_lists_tied_once_and_skips_non_persistent() -> None:
    names = list(model_tensors(tiny()))
    assert "head.weight" not in names and names.count("embed.weight") == 1
    assert "steps" in names and "cache" not in names


def test_every_checkpoint_key_is_accounted_for(tmp_path: Path) -> None:
    with Checkpoint.open(write(tmp_path, tiny())) as checkpoint:
        plan = plan_load(model_tensors(tiny()), Fp8StateDictAdapter(checkpoint), checkpoint)
        consumed = sorted(key for planned in plan.values() for key in planned.source.keys)
        assert consumed == sorted(checkpoint.keys())
        assert plan["up.weight"].source == TensorSource(
            "up.weight", scale_key="up.weight_scale_inv", dropped_keys=("up.activation_scale",)
        )
        assert plan["norm.weight"].source == TensorSource("norm.weight")


def test_unexpected_keys_are_listed_unless_allowed(tmp_path: Path) -> None:
    extra = {"layers.9.weight": torch.zeros(2), "rogue": torch.zeros(1)}
    with Checkpoint.open(write(tmp_path, tiny(), extra=extra)) as checkpoint:
        adapter = Fp8StateDictAdapter(checkpoint)
        with pytest.raises(UnexpectedKeysError) as caught:
            plan_load(model_tensors(tiny()), adapter, checkpoint)
        assert caught.value.keys == sorted(extra) and all(k in str(caught.value) for k in extra)
        assert str(tmp_path.resolve()) in str(caught.value)
        plan = plan_load(model_tensors(tiny()), adapter, checkpoint, allow_unused=True)
        assert not plan.consumed_keys() & set(extra)
        assert plan.unused_keys == sorted(extra)


def test_missing_keys_name_model_tensor_and_checkpoint_key(tmp_path: Path) -> None:
    path = write(tmp_path, tiny(), prefix="model.", drop=("model.norm.bias", "model.steps"))
    with Checkpoint.open(path) as checkpoint:
        adapter = Fp8StateDictAdapter(checkpoint, renames=[PrefixRename(model="", checkpoint="model.")])
        with pytest.raises(MissingKeysError) as caught:
            plan_load(model_tensors(tiny()), adapter, checkpoint)
    assert caught.value.keys == [
        "norm.bias (checkpoint key 'model.norm.bias')",
        "steps (checkpoint key 'model.steps')",
    ]


def test_renames_map_both_ways(tmp_path: Path) -> None:
    renames = [
        PrefixRename(model="", checkpoint="model."),
        PrefixRename(model="head.", checkpoint="lm.head."),
    ]
    with Checkpoint.open(write(tmp_path, tiny(), prefix="model.")) as checkpoint:
        adapter = Fp8StateDictAdapter(checkpoint, renames=renames)
        assert adapter.to_hf("up.weight") == "model.up.weight"
        assert adapter.to_hf("head.weight") == "lm.head.weight"  # the longest rule wins
        assert adapter.from_hf_key("lm.head.weight") == "head.weight"
        plan = plan_load(model_tensors(tiny()), adapter, checkpoint)
        assert plan["down.weight"].source.scale_key == "model.down.weight_scale_inv"


def test_fp8_weight_without_scale_names_the_weight(tmp_path: Path) -> None:
    path = write(tmp_path, tiny(), drop=("down.weight_scale_inv",))
    with Checkpoint.open(path) as checkpoint, pytest.raises(ScaleError) as caught:
        plan_load(model_tensors(tiny()), Fp8StateDictAdapter(checkpoint), checkpoint)
    assert caught.value.key == "down.weight" and "down.weight_scale_inv" in str(caught.value)


class PointsAtNothing(StateDictAdapter):
    """An adapter that claims a scale the checkpoint lacks."""

    def from_hf(self, name: str) -> TensorSource:
        return TensorSource(name, scale_key=name + "_scale_nowhere" if name == "up.weight" else None)

    def to_hf(self, name: str) -> str:
        return name


def test_scale_key_absent_from_the_checkpoint_is_refused(tmp_path: Path) -> None:
    with (
        Checkpoint.open(write(tmp_path, tiny())) as checkpoint,
        pytest.raises(ScaleError, match="_scale_nowhere"),
    ):
        plan_load(model_tensors(tiny()), PointsAtNothing(), checkpoint, allow_unused=True)


def test_fp8_tensor_without_scale_reaching_the_loader(tmp_path: Path) -> None:
    with (
        Checkpoint.open(write(tmp_path, tiny())) as checkpoint,
        pytest.raises(ScaleError, match="without a scale"),
    ):
        read_value(checkpoint, TensorSource("up.weight"), dtype=torch.bfloat16, device=torch.device("cpu"))


def test_fp8_in_a_module_never_converted_names_the_key(tmp_path: Path) -> None:
    with Checkpoint.open(write(tmp_path, tiny())) as checkpoint:
        adapter = Fp8StateDictAdapter(checkpoint, modules_to_not_convert=("down",))
        with pytest.raises(CheckpointError, match="modules_to_not_convert") as caught:
            plan_load(model_tensors(tiny()), adapter, checkpoint)
    assert caught.value.key == "down.weight"


# --- shape and dtype --------------------------------------------------------------------------------------


def _stream(path: Path, model: nn.Module, *, assign: bool, dtype: torch.dtype = torch.bfloat16):
    """Assign into a meta model (floats in ``dtype``) or copy into a real one (each tensor's own dtype)."""
    assert assign == any(t.is_meta for t in model.parameters())
    with Checkpoint.open(path) as checkpoint:
        adapter = Fp8StateDictAdapter(checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint, dtype=dtype if assign else None)
        return stream_into(model, plan, checkpoint, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("key", "dtype"), [("norm.weight", torch.bfloat16), ("up.weight", torch.float8_e4m3fn)]
)
def test_shape_mismatch_names_the_key(tmp_path: Path, key: str, dtype: torch.dtype) -> None:
    path = write(tmp_path, tiny(), drop=(key,), extra={key: torch.zeros(3, 3).to(dtype)})
    with pytest.raises(ShapeMismatchError, match=r"\(3, 3\)") as caught:
        _stream(path, meta_tiny(), assign=True)
    assert caught.value.key == key and key in str(caught.value)


def test_float_into_integer_buffer_is_a_dtype_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path, tiny(), drop=("steps",), extra={"steps": torch.zeros(3)})
    with pytest.raises(DtypeMismatchError, match="float32") as caught:
        _stream(path, meta_tiny(), assign=True)
    assert caught.value.key == "steps"


def test_integer_into_float_parameter_is_a_dtype_mismatch(tmp_path: Path) -> None:
    path = write(
        tmp_path, tiny(), drop=("norm.bias",), extra={"norm.bias": torch.zeros(8, dtype=torch.int32)}
    )
    with pytest.raises(DtypeMismatchError, match="int32") as caught:
        _stream(path, meta_tiny(), assign=True)
    assert caught.value.key == "norm.bias"


# --- meta -> assign, and copy into real tensors -----------------------------------------------------------


def test_meta_model_gets_assigned_real_tensors(tmp_path: Path) -> None:
    path = write(tmp_path, tiny())
    model = meta_tiny()
    model.embed.weight.requires_grad_(False)
    report = _stream(path, model, assign=True)
    assert model.head.weight.is_meta  # assign replaces Parameters: the caller re-ties (HF: tie_weights())
    model.head.weight = model.embed.weight
    ensure_no_meta_params(model)
    with Checkpoint.open(path) as checkpoint:
        for name, tensor in model_tensors(model).items():
            expected = expected_value(checkpoint, name, torch.bfloat16)
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    assert isinstance(model.up.weight, nn.Parameter) and model.up.weight.requires_grad
    assert not model.embed.weight.requires_grad  # kept as it was
    assert isinstance(model.steps, torch.Tensor) and not isinstance(model.steps, nn.Parameter)
    assert (report.tensors, report.dequantized, report.used_in_place, report.converted) == (7, 2, 5, 0)
    assert sorted(report.dropped_keys) == ["down.activation_scale", "up.activation_scale"]


def ensure_no_meta_params(model: nn.Module) -> None:
    assert not any(t.is_meta for t in model.parameters())
    assert model.cache.is_meta  # non-persistent: the loader leaves it to the plugin (pipeline poisons it)
    with pytest.raises(CheckpointError, match="cache"):
        ensure_materialized(model)


def test_assign_in_float32_converts(tmp_path: Path) -> None:
    path = write(tmp_path, tiny())
    model = meta_tiny()
    report = _stream(path, model, assign=True, dtype=torch.float32)
    assert model.norm.weight.dtype == torch.float32 and model.steps.dtype == torch.int64
    assert (report.dequantized, report.converted, report.used_in_place) == (2, 4, 1)  # steps stays int64


def test_copy_into_real_tensors_keeps_them(tmp_path: Path) -> None:
    path = write(tmp_path, tiny(0))
    model = tiny(1).to(torch.bfloat16)
    identities = {name: tensor for name, tensor in model_tensors(model).items()}
    report = _stream(path, model, assign=False)
    assert all(model_tensors(model)[name] is tensor for name, tensor in identities.items())
    with Checkpoint.open(path) as checkpoint:
        for name, tensor in model_tensors(model).items():
            assert torch.equal(tensor, expected_value(checkpoint, name, torch.bfloat16)), name
    assert model.head.weight is model.embed.weight
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in _scales_and_data(path))


def _scales_and_data(path: Path) -> list[torch.Tensor]:
    """What a copy-in reads: every tensor but the (dropped) activation scales."""
    with Checkpoint.open(path) as checkpoint:
        return [checkpoint.read(k) for k in checkpoint if not k.endswith("activation_scale")]


# --- Checkpoint.read regions ------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "cube": torch.randn(6, 5, 7, generator=g),
        "plane": torch.randn(9, 13, generator=g).to(torch.bfloat16),
        "f8": torch.randn(11, 10, generator=g).to(torch.float8_e4m3fn),
        "ints": torch.arange(40, dtype=torch.int32).reshape(4, 10),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


REGIONS = [
    ("cube", (slice(1, 4),)),
    ("cube", (slice(1, 4), slice(2, 5))),
    ("cube", (slice(1, 4), slice(2, 5), slice(3, 6))),
    ("cube", (slice(None), slice(None), slice(6, 7))),
    ("cube", (slice(None), slice(0, 1), slice(None))),
    ("cube", (slice(-2, None), slice(-3, -1), slice(None, 2))),
    ("plane", (slice(None), slice(3, 9))),
    ("plane", (slice(4, 5), slice(12, 13))),
    ("plane", (slice(0, 100), slice(None))),
    ("f8", (slice(None), slice(7, 10))),
    ("f8", (slice(2, 9), slice(1, 2))),
    ("ints", (slice(1, 3), slice(5, 10))),
]


@pytest.mark.parametrize(("key", "region"), REGIONS)
def test_read_region_equals_slicing_and_counts_only_the_region(stored, key: str, region: tuple) -> None:
    path, tensors = stored
    expected = tensors[key][region]
    with Checkpoint.open(path) as checkpoint:
        got = checkpoint.read(key, region)
        assert checkpoint.bytes_read == expected.numel() * expected.element_size()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8))
    assert got.is_contiguous()


@pytest.mark.parametrize(
    ("key", "region"),
    [("cube", (slice(3, 3),)), ("cube", (slice(None), slice(4, 4))), ("plane", (slice(2, 5), slice(9, 2)))],
)
def test_read_empty_region_reads_nothing(stored, key: str, region: tuple) -> None:
    path, tensors = stored
    with Checkpoint.open(path) as checkpoint:
        got = checkpoint.read(key, region)
        assert checkpoint.bytes_read == 0
    assert got.numel() == 0 and got.shape == tensors[key][region].shape


def test_read_without_region_is_a_private_copy(stored) -> None:
    path, tensors = stored
    with Checkpoint.open(path) as checkpoint:
        first = checkpoint.read("cube")
        first.zero_()
        assert torch.equal(checkpoint.read("cube"), tensors["cube"])
        assert checkpoint.bytes_read == 2 * tensors["cube"].numel() * 4


def test_read_region_rejects_steps_and_extra_slices(stored) -> None:
    path, _ = stored
    with Checkpoint.open(path) as checkpoint:
        with pytest.raises(ValueError, match="step"):
            checkpoint.read("plane", (slice(0, 8, 2),))
        with pytest.raises(ValueError, match="3 slices"):
            checkpoint.read("plane", (slice(None),) * 3)
        assert checkpoint.bytes_read == 0


def test_region_of_an_fp8_weight_dequantizes_like_the_whole(tmp_path: Path) -> None:
    """The path a sharded rank takes: its rows/columns of the FP8 data times the block grid it falls in."""
    weight = torch.randn(40, 24)
    data, grid = fp8.quantize(weight, block_size=(16, 16))
    save_file({"w": data, "w_scale": grid}, tmp_path / "model.safetensors")
    source = TensorSource("w", scale_key="w_scale", block_size=(16, 16))
    with Checkpoint.open(tmp_path) as checkpoint:
        whole, _ = read_value(checkpoint, source, dtype=torch.float32, device=torch.device("cpu"))
        for region in [(slice(5, 33), slice(17, 24)), (slice(20, 40),), (slice(0, 40), slice(0, 1))]:
            part, how = read_value(
                checkpoint, source, dtype=torch.float32, device=torch.device("cpu"), region=region
            )
            assert how == "dequantized" and torch.equal(part, whole[region]), region
