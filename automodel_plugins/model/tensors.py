"""A model's tensors as the loader sees them: by state-dict name, materialized or not.

``model_tensors`` names every parameter and persistent buffer (what a checkpoint holds); the rest of this
module guards the two ways a model can end up running on values nobody loaded: a tensor left on ``meta``,
and a non-persistent buffer (no checkpoint carries it) that nobody recomputed after materialization.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from automodel_plugins.errors import CheckpointError

__all__ = [
    "ensure_materialized",
    "model_tensors",
    "non_finite_buffers",
    "poison_meta_buffers",
    "stock_names",
    "unrecomputed_buffers",
    "unwrap_peft",
]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name; a tied tensor appears once, under its first name."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer
    return tensors


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (the model itself when it is not one)."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def stock_names(model: nn.Module) -> dict[str, str]:
    """State-dict name of the stock model -> the name the tensor has in ``model``, for every tensor a
    checkpoint holds.

    The same name without PEFT. Inside PEFT tuner layers (``lora.Linear`` and kin: a ``base_layer`` plus
    adapter layers) the base layer's tensors drop the ``.base_layer`` PEFT inserted, and adapter tensors
    (``lora_A``, ``lora_B``, ...), which no checkpoint of the model holds, are left out.
    """
    renames: dict[str, str] = {}  # "<tuner>.base_layer." -> "<tuner>."
    adapters: list[str] = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(
            module, "adapter_layer_names"
        ):
            prefix = f"{name}." if name else ""
            renames[f"{prefix}base_layer."] = prefix
            others = tuple(getattr(module, "other_param_names", ()))
            adapters += [f"{prefix}{child}." for child in (*module.adapter_layer_names, *others)]
    names = {}
    for name in model_tensors(model):
        if any(name.startswith(prefix) for prefix in adapters):
            continue
        stock = name
        for inserted in sorted(renames, key=len, reverse=True):  # innermost tuner first
            if stock.startswith(inserted):
                stock = renames[inserted] + stock[len(inserted) :]
        names[stock] = name
    return names


def ensure_materialized(model: nn.Module, *, hint: str = "") -> None:
    """Raise :class:`CheckpointError` naming the tensors (parameters or buffers) still on the meta device."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        shown = ", ".join(left[:20]) + (f", ... ({len(left) - 20} more)" if len(left) > 20 else "")
        raise CheckpointError(f"{len(left)} model tensor(s) are still on the meta device: {shown}{hint}")


def _poison(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    fill = math.nan if tensor.dtype.is_floating_point else torch.iinfo(tensor.dtype).min
    return torch.full(tensor.shape, fill, dtype=tensor.dtype, device=device)


def _is_poisoned(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return False
    if tensor.dtype.is_floating_point:
        return bool(torch.isnan(tensor).all())
    return bool((tensor == torch.iinfo(tensor.dtype).min).all())


def poison_meta_buffers(model: nn.Module, device: torch.device | Callable[[str], torch.device]) -> list[str]:
    """Give buffers still on meta (non-persistent: never in a checkpoint) a poison value, to be recomputed.

    NaN (or the integer minimum) rather than uninitialized memory, so that a buffer nobody recomputed is
    caught by :func:`unrecomputed_buffers` instead of running silently wrong. ``device`` may be a function of
    the buffer's name (a ``device_map``). Returns their names.
    """
    poisoned = []
    for module_name, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                full = f"{module_name}.{name}" if module_name else name
                module._buffers[name] = _poison(buffer, device(full) if callable(device) else device)
                poisoned.append(full)
    return poisoned


def unrecomputed_buffers(model: nn.Module, poisoned: list[str]) -> list[str]:
    """The buffers of ``poisoned`` that still hold the poison value."""
    return [name for name in poisoned if _is_poisoned(model.get_buffer(name))]


def non_finite_buffers(model: nn.Module, names: list[str], *, suffix: str) -> list[str]:
    """The float buffers of ``names`` ending in ``suffix`` that hold any NaN or inf (recomputed, but wrongly).

    Limited by suffix on purpose: some non-persistent buffers are legitimately infinite (``-inf`` masks)."""
    return [
        name
        for name in names
        if name.endswith(suffix)
        and (buffer := model.get_buffer(name)).is_floating_point()
        and not bool(torch.isfinite(buffer).all())
    ]
