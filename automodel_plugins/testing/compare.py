"""Check that a plugin loads a checkpoint exactly as stock transformers does.

:func:`assert_matches_stock` loads one checkpoint twice, through ``automodel_plugins.from_pretrained`` (the
plugin that claims it) and through the stock class, and asserts the same state dict bit for bit, the same
rotary buffers, and the same logits for the inputs given. Where stock transformers cannot read a format
correctly, the expected model is the stock class holding :func:`reference_dequantized_state_dict`, an FP8
dequantization written here independently of the host's (``(w.float() * expanded_scale.float()).to(dtype)``).

transformers 5.24 on CPU dequantizes block FP8 with a block size derived from the scale grid
(``rows // grid_rows``), which is wrong for partial edge blocks whenever a dimension exceeds the block and is
not a multiple of it (a 200-wide weight in 128 blocks is read as two 100-wide blocks, silently):
:func:`stock_reads_exactly` tells those checkpoints apart, and ``expected="auto"`` compares them with the
reference instead.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from automodel_plugins.model.rotary import find_rotary_modules

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from automodel_plugins.registry import Registry

__all__ = [
    "Comparison",
    "assert_matches_stock",
    "assert_same_logits",
    "assert_same_rotary",
    "assert_same_state_dict",
    "load_stock",
    "reference_dequantized_state_dict",
    "reference_model",
    "stock_reads_exactly",
]

Expected = Literal["auto", "stock", "reference"]
_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "qscale_weight")
_ACTIVATION_SUFFIXES = ("activation_scale", "input_scale", "qscale_act")
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass
class Comparison:
    """The two models compared, and what the plugin's load was compared with (``stock`` or ``reference``)."""

    ours: PreTrainedModel
    expected: PreTrainedModel
    against: Literal["stock", "reference"]


def assert_matches_stock(
    path: str | Path,
    *,
    model_class: type[PreTrainedModel] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    inputs: Mapping[str, Any] | None = None,
    plugin: str | None = None,
    expected: Expected = "auto",
    registry: Registry | None = None,
) -> Comparison:
    """Load ``path`` through the claiming plugin and through stock transformers; assert they are the same model.

    ``expected``: ``"stock"`` loads with the stock ``from_pretrained`` (transformers' own dequantization),
    ``"reference"`` puts :func:`reference_dequantized_state_dict` into the stock class, ``"auto"`` picks
    stock when :func:`stock_reads_exactly`. ``plugin`` also asserts which plugin composed the model. ``inputs``:
    keyword arguments of one forward whose logits must be equal. Returns both models for further checks.
    """
    import automodel_plugins

    ours = automodel_plugins.from_pretrained(path, dtype=dtype, require_plugin=True, registry=registry)
    if plugin is not None:
        assert ours.automodel_composition.plugin == plugin, (
            f"{path}: composed by {ours.automodel_composition.plugin!r}, expected plugin {plugin!r}"
        )
    against = (
        "stock" if expected == "stock" or (expected == "auto" and stock_reads_exactly(path)) else "reference"
    )
    if against == "stock":
        reference = load_stock(path, model_class=model_class, dtype=dtype)
    else:
        reference = reference_model(path, model_class=model_class, dtype=dtype)
    assert_same_state_dict(ours, reference)
    assert_same_rotary(ours, reference)
    if inputs is not None:
        assert_same_logits(ours, reference, inputs)
    return Comparison(ours=ours, expected=reference, against=against)


# --- the expected model -----------------------------------------------------------------------------------


def load_stock(
    path: str | Path, *, model_class: type[PreTrainedModel] | None = None, dtype: torch.dtype = torch.bfloat16
) -> PreTrainedModel:
    """The stock ``from_pretrained`` of ``path`` (local files only; FP8 dequantized by transformers on CPU)."""
    from transformers.utils import logging

    cls = model_class or _stock_class_of(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "no GPU: dequantizing" notice, once per load
    try:
        return cls.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()
    finally:
        logging.set_verbosity(verbosity)


def reference_model(
    path: str | Path,
    *,
    model_class: type[PreTrainedModel] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    rename: Callable[[str], str] | None = None,
) -> PreTrainedModel:
    """The stock class built from the config (unquantized), holding :func:`reference_dequantized_state_dict`.

    ``rename`` maps checkpoint keys to model names (a legacy key layout). Only tied weights may be missing.
    """
    from automodel_plugins.sources import load_config

    config = copy.deepcopy(load_config(path))
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    cls = model_class or _stock_class_of(path)
    torch.manual_seed(0)  # the init is overwritten; seeded so that a failure reproduces
    model = cls._from_config(config, dtype=dtype)
    state = reference_dequantized_state_dict(path, dtype=dtype, rename=rename)
    result = model.load_state_dict(state, strict=False)
    tied = set(_tied_names(model))
    missing = [name for name in result.missing_keys if name not in tied]
    assert not missing and not result.unexpected_keys, (
        f"{path}: reference state dict does not fit {cls.__name__}: missing {missing[:5]}, "
        f"unexpected {result.unexpected_keys[:5]}"
    )
    model.tie_weights()
    return model.eval()


def reference_dequantized_state_dict(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, rename: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor as a model would hold it: FP8 weights times their expanded scale, in ``dtype``.

    Scales (``weight_scale_inv``, ``weight_scale``, ``qscale_weight``) are 0-d (per tensor) or one per block
    of ``quantization_config.weight_block_size`` (partial edge blocks included; fp32, bf16 or E8M0 bytes);
    activation scales are dropped; other floats are cast to ``dtype``, integers kept.
    """
    tensors = dict(_read_all(Path(path)))
    block = _block_size(Path(path))
    rename = rename or (lambda key: key)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(_SCALE_SUFFIXES + _ACTIVATION_SUFFIXES):
            continue
        if tensor.dtype in _FP8:
            scale = _scale_of(key, tensors)
            value = (tensor.float() * _expand(scale, tensor.shape, block)).to(dtype)
        else:
            value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        out[rename(key)] = value
    return out


def stock_reads_exactly(path: str | Path) -> bool:
    """Whether stock transformers dequantizes this checkpoint's block FP8 correctly.

    It derives the block from the scale grid, so every dimension of every FP8 weight must fit in one block or
    be a multiple of the block. Per-tensor scales and unquantized checkpoints are always read exactly.
    """
    block = _block_size(Path(path))
    if block is None:
        return True
    return all(
        dim <= size or dim % size == 0
        for shape in _fp8_shapes(Path(path))
        for dim, size in zip(shape, block, strict=True)
    )


# --- assertions -------------------------------------------------------------------------------------------


def assert_same_state_dict(ours: nn.Module, expected: nn.Module) -> None:
    """Same names, dtypes and shapes, and bit-identical values (the first mismatches are named)."""
    got, want = ours.state_dict(), expected.state_dict()
    assert got.keys() == want.keys(), (
        f"state dict names differ: only ours {sorted(got.keys() - want.keys())[:5]}, "
        f"only expected {sorted(want.keys() - got.keys())[:5]}"
    )
    problems = [_difference(name, got[name], want[name]) for name in want]
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} tensor(s) differ: " + "; ".join(problems[:5])


def assert_same_rotary(ours: nn.Module, expected: nn.Module) -> None:
    """The same rotary modules, with bit-identical frequency buffers and equal ``attention_scaling``."""
    got, want = dict(find_rotary_modules(ours)), dict(find_rotary_modules(expected))
    assert got.keys() == want.keys(), f"rotary modules differ: ours {sorted(got)}, expected {sorted(want)}"
    for name, module in want.items():
        for buffer_name in module._non_persistent_buffers_set:
            problem = _difference(
                f"{name}.{buffer_name}", got[name].get_buffer(buffer_name), module.get_buffer(buffer_name)
            )
            assert not problem, f"rotary buffer {problem}"
        scaling = getattr(module, "attention_scaling", None)
        assert getattr(got[name], "attention_scaling", None) == scaling, f"{name}.attention_scaling differs"


def assert_same_logits(ours: nn.Module, expected: nn.Module, inputs: Mapping[str, Any]) -> None:
    """Bit-identical logits of one forward of each model on the same ``inputs``."""
    with torch.no_grad():
        got, want = ours(**inputs).logits, expected(**inputs).logits
    problem = _difference("logits", got, want)
    assert not problem, problem


def _difference(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why two tensors are not the same, or ``None``."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{name}: {got.dtype}{tuple(got.shape)} vs expected {want.dtype}{tuple(want.shape)}"
    if torch.equal(got, want):
        return None
    diff = (got.float() - want.float()).abs()
    return f"{name}: {int((diff > 0).sum())} element(s) differ, max |diff| {diff.max().item():.3g}"


# --- reading the checkpoint independently -----------------------------------------------------------------


def _files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    return [directory / "model.safetensors"]


def _read_all(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a mapping)
                yield key, handle.get_tensor(key)


def _fp8_shapes(directory: Path) -> Iterator[tuple[int, ...]]:
    for file in _files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                sliced = handle.get_slice(key)
                if sliced.get_dtype().startswith("F8_"):
                    yield tuple(sliced.get_shape())


def _block_size(directory: Path) -> tuple[int, int] | None:
    config = json.loads((directory / "config.json").read_text())
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    return (int(block[0]), int(block[1])) if block else None


def _scale_of(key: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    base = key.removesuffix("weight")
    found = [tensors[base + suffix] for suffix in _SCALE_SUFFIXES if base + suffix in tensors]
    assert len(found) == 1, f"{key}: expected one weight scale, found {len(found)}"
    scale = found[0]
    if scale.dtype == torch.uint8:  # E8M0 exponent bytes
        return (scale.float() - 127.0).exp2()
    return scale.float()


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] | None) -> torch.Tensor:
    """The scale of every element: the 0-d scale, or each block's scale repeated over its (partial) block."""
    if block is None:
        return scale.reshape(())
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _tied_names(model: nn.Module) -> Iterator[str]:
    """Names whose tensor is another name's (``lm_head.weight`` of a tied head)."""
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            yield name
        seen.setdefault(id(tensor), name)


def _stock_class_of(path: str | Path) -> type[PreTrainedModel]:
    from automodel_plugins.model.stock import stock_class
    from automodel_plugins.sources import load_config

    return stock_class(load_config(path))
