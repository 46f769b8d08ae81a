"""Streaming a checkpoint into a model, one tensor (or one rank's slice of it) at a time.

Two ways in: ``assign`` puts freshly read tensors into a model still on the meta device (a BF16 tensor that
needs no conversion is used in place, memory-mapped, never copied); ``copy`` writes into a model whose tensors
are already real, for example sharded by FSDP2, where only the rank's own region of each tensor is read.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from automodel_plugins import fp8
from automodel_plugins.adapter import StateDictAdapter, TensorSource
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.distributed import local_region, write_local
from automodel_plugins.errors import (
    CheckpointError,
    DtypeMismatchError,
    MissingKeysError,
    ScaleError,
    ShapeMismatchError,
    UnexpectedKeysError,
)

Region = tuple[slice, ...]


@dataclass
class LoadReport:
    """What a load did; attached to the model's composition record."""

    tensors: int = 0
    dequantized: int = 0
    used_in_place: int = 0
    converted: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    unused_keys_allowed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name; a tied tensor appears once, under its first name."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer
    return tensors


def plan_load(
    names: Iterable[str], adapter: StateDictAdapter, checkpoint: Checkpoint, *, allow_unused: bool = False
) -> dict[str, TensorSource]:
    """Ask the adapter where every model tensor lives, and account for every checkpoint key strictly.

    Missing keys always fail. Unused checkpoint keys fail unless ``allow_unused`` (a pipeline stage holds only
    some of the model, so the other stages' tensors are expected to be left).
    """
    plan = {name: adapter.from_hf(name) for name in names}
    missing = sorted(
        f"{name} (checkpoint key {src.key!r})" for name, src in plan.items() if src.key not in checkpoint
    )
    if missing:
        raise MissingKeysError(missing, path=checkpoint.directory)
    absent_scales = sorted(
        src.scale_key for src in plan.values() if src.scale_key and src.scale_key not in checkpoint
    )
    if absent_scales:
        raise ScaleError(
            f"scale tensor(s) not in the checkpoint: {', '.join(absent_scales)}", path=checkpoint.directory
        )
    consumed = {key for src in plan.values() for key in src.keys}
    unused = [key for key in checkpoint if key not in consumed]
    if unused and not allow_unused:
        raise UnexpectedKeysError(unused, path=checkpoint.directory)
    return plan


def read_value(
    checkpoint: Checkpoint,
    source: TensorSource,
    *,
    dtype: torch.dtype,
    device: torch.device,
    region: Region | None = None,
    in_place_ok: bool = False,
) -> tuple[torch.Tensor, str]:
    """The model's value for ``source`` (or its ``region``), and how it was made: dequantized/in place/converted."""
    info = checkpoint.info(source.key)
    if source.scale_key is not None:
        scale = checkpoint.read(source.scale_key)
        fp8.validate_scale(
            scale,
            weight_shape=info.shape,
            block_size=source.block_size,
            key=source.scale_key,
            path=checkpoint.info(source.scale_key).file,
        )
        data = checkpoint.read(source.key, region).to(device)
        block_region = None if region is None or source.block_size is None else region
        return fp8.dequantize(
            data, scale.to(device), dtype=dtype, block_size=source.block_size, region=block_region
        ), "dequantized"
    if fp8.is_fp8(info.dtype):
        raise ScaleError(
            "FP8 tensor without a scale reached the loader (the adapter gave none)",
            path=info.file,
            key=source.key,
        )
    target_dtype = dtype if info.dtype.is_floating_point else info.dtype
    if in_place_ok and region is None and info.dtype == target_dtype and device.type == "cpu":
        return checkpoint.tensor(source.key), "used_in_place"
    data = checkpoint.read(source.key, region)
    return data.to(
        device=device, dtype=target_dtype
    ), "converted" if data.dtype != target_dtype else "used_in_place"


def stream_into(
    model: nn.Module,
    plan: dict[str, TensorSource],
    checkpoint: Checkpoint,
    *,
    dtype: torch.dtype,
    device: torch.device,
    assign: bool,
    progress: bool | None = None,
) -> LoadReport:
    """Load every planned tensor into ``model``. ``assign``: the model is on meta and gets new tensors."""
    report = LoadReport()
    started, bytes_before = time.perf_counter(), checkpoint.bytes_read
    targets = model_tensors(model)
    order = {key: i for i, key in enumerate(checkpoint.keys())}
    names = sorted(plan, key=lambda name: order[plan[name].key])
    for name in _progress(names, enabled=progress, total_bytes=checkpoint.total_nbytes()):
        source, target = plan[name], targets[name]
        _check_compatible(name, target, source, checkpoint)
        region = None if assign else local_region(target)
        value, how = read_value(
            checkpoint,
            source,
            dtype=dtype if assign else target.dtype,
            device=device if assign else target.device,
            region=region,
            in_place_ok=assign,
        )
        if assign:
            _assign(model, name, target, value)
        else:
            write_local(target, value)
        report.tensors += 1
        setattr(report, how, getattr(report, how) + 1)
        report.dropped_keys.extend(source.dropped_keys)
    report.bytes_read = checkpoint.bytes_read - bytes_before
    report.seconds = time.perf_counter() - started
    return report


def _check_compatible(name: str, target: torch.Tensor, source: TensorSource, checkpoint: Checkpoint) -> None:
    info = checkpoint.info(source.key)
    if tuple(info.shape) != tuple(target.shape):
        raise ShapeMismatchError(
            f"checkpoint shape {tuple(info.shape)} does not fit model tensor {name!r} of shape {tuple(target.shape)}",
            path=info.file,
            key=source.key,
        )
    both_float = target.dtype.is_floating_point and (info.dtype.is_floating_point or fp8.is_fp8(info.dtype))
    if not both_float and info.dtype != target.dtype:
        raise DtypeMismatchError(
            f"checkpoint dtype {info.dtype} cannot load into model tensor {name!r} of dtype {target.dtype}",
            path=info.file,
            key=source.key,
        )


def _assign(model: nn.Module, name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(target, nn.Parameter):
        module._parameters[leaf] = nn.Parameter(value, requires_grad=target.requires_grad)
    else:
        module._buffers[leaf] = value


def _progress(names: list[str], *, enabled: bool | None, total_bytes: int) -> Iterator[str] | list[str]:
    """A per-tensor bar that appears only after a second, never under pytest, never when disabled."""
    if enabled is None:
        enabled = (
            os.environ.get("AUTOMODEL_PLUGINS_PROGRESS", "1") != "0"
            and "PYTEST_CURRENT_TEST" not in os.environ
            and sys.stderr.isatty()
        )
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc=f"loading {total_bytes / 2**30:.2f} GiB", unit="tensor", delay=1.0, leave=False)


def ensure_no_meta(model: nn.Module) -> None:
    """Fail loudly if any tensor was left unloaded on the meta device."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{len(left)} model tensor(s) were never loaded: {', '.join(left[:20])}")
