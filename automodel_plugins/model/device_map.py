"""transformers' ``device_map`` on the plugin path: which device each tensor is streamed to.

The map is settled on the meta model before any tensor is read (an automatic one computed by transformers' own
``_get_device_map``, the function its ``from_pretrained`` calls, from the meta model's sizes in the load's
dtype, so FP8-resident layers count at their FP8 size); the loader then creates each tensor directly on the
device its module is mapped to, never the whole model on one device first. A map over several devices gets
accelerate's dispatch hooks afterwards, as stock does. Disk offload and ``"meta"`` entries are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from automodel_plugins.errors import LoadOptionError

__all__ = [
    "STRATEGIES",
    "Placement",
    "device_of",
    "dispatch",
    "normalize_device_map",
    "resolve_device_map",
    "tensor_devices",
]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = dict[str, torch.device]


def normalize_device_map(device_map: Any) -> DeviceMap | str | None:
    """``device_map`` as transformers reads it: a strategy name stays a name; a device (a name, an index, a
    ``torch.device``) becomes ``{"": device}`` (``"cuda"``: this process's ``LOCAL_RANK``); a dict's values
    become devices. Refuses what cannot be streamed to: ``"disk"``, ``"meta"``, a device this machine lacks."""
    if device_map is None or (isinstance(device_map, str) and device_map in STRATEGIES):
        return device_map
    if isinstance(device_map, Mapping):
        if not device_map:
            raise LoadOptionError("device_map", "an empty dict maps no module to a device")
        return {str(module): _device(value, module) for module, value in device_map.items()}
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        if device_map == "cuda":
            device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return {"": _device(device_map, "")}
    raise LoadOptionError(
        "device_map",
        f"{device_map!r}: give a device, a dict of module name -> device, or one of {', '.join(STRATEGIES)}",
    )


def _device(value: Any, module: str) -> torch.device:
    where = f"module {module!r}" if module else "the model"
    if value == "disk":
        raise LoadOptionError(
            "device_map",
            f"{where} is mapped to 'disk': disk offload is not supported when a plugin loads the checkpoint; "
            "map every module to a device (or give max_memory room for all of them)",
        )
    if isinstance(value, int) and not isinstance(value, bool):
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            raise LoadOptionError(
                "device_map",
                f"{where} is mapped to device index {value}, an accelerator, but this machine has no accelerator "
                f"device (torch {torch.__version__})",
            )
        value = torch.device(accelerator.type, value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise LoadOptionError("device_map", f"{where}: {value!r} is not a device ({exc})") from exc
    if device.type == "meta":
        raise LoadOptionError(
            "device_map",
            f"{where} is mapped to 'meta': from_pretrained loads weights; for a model without them use "
            "automodel_plugins.build_model",
        )
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", lambda: False)()
        count = getattr(backend, "device_count", lambda: 0)() if available else 0
        if not available or (device.index is not None and device.index >= count):
            raise LoadOptionError(
                "device_map",
                f"{where} is mapped to {str(device)!r}, but this machine has "
                + (f"{count} {device.type} device(s)" if available else f"no {device.type} device")
                + f" (torch {torch.__version__})",
            )
    return device


def resolve_device_map(model: nn.Module, device_map: DeviceMap | str, max_memory: Any) -> DeviceMap:
    """The explicit map, or the one transformers computes for ``model`` (on meta) under ``max_memory``."""
    if not isinstance(device_map, str):
        if max_memory is not None:
            raise LoadOptionError(
                "max_memory",
                "applies to an automatic device_map (auto, balanced, ...), not to an explicit one",
            )
        return device_map
    from transformers.integrations.accelerate import _get_device_map

    computed = _get_device_map(model, device_map, max_memory, None)
    if "disk" in computed.values():
        first = next(name for name, value in computed.items() if value == "disk")
        raise LoadOptionError(
            "device_map",
            f"device_map={device_map!r} under max_memory={max_memory!r} offloads module {first!r} to disk, "
            "which is not supported when a plugin loads the checkpoint: raise max_memory",
        )
    return {module: _device(value, module) for module, value in computed.items()}


def device_of(device_map: Mapping[str, torch.device], name: str) -> torch.device | None:
    """The device of tensor (or module) ``name``: its longest mapped enclosing module (``""``: all)."""
    best: str | None = None
    for module in device_map:
        if (not module or name == module or name.startswith(module + ".")) and (
            best is None or len(module) > len(best)
        ):
            best = module
    return None if best is None else device_map[best]


def tensor_devices(device_map: Mapping[str, torch.device], names: Iterable[str]) -> dict[str, torch.device]:
    """Each of ``names`` -> its device; one no entry covers goes to the CPU, as in transformers' loader."""
    return {name: device_of(device_map, name) or torch.device("cpu") for name in names}


def dispatch(model: nn.Module, device_map: Mapping[str, torch.device]) -> None:
    """A map over several devices gets accelerate's hooks (moving activations between them), as transformers'
    ``from_pretrained`` does; a single device needs none."""
    if len(set(device_map.values())) <= 1:
        return
    from accelerate import dispatch_model

    dispatch_model(
        model,
        device_map={module: str(device) for module, device in device_map.items()},
        skip_keys=getattr(model, "_skip_keys_device_placement", None),
    )


@dataclass
class Placement:
    """Where a load puts each tensor: one device (``default``), or a map over modules settled on the meta
    model (``device_map``, kept for accelerate's dispatch hooks)."""

    default: torch.device
    device_map: dict[str, torch.device] | None = None

    @classmethod
    def of(
        cls, model: nn.Module, device_map: dict[str, torch.device] | str | None, max_memory: Any
    ) -> Placement:
        """Settle ``device_map`` (normalized) for ``model``, still on meta; a map that puts every tensor on one
        device is that device, with no hooks (as transformers)."""
        if device_map is None:
            if max_memory is not None:
                raise LoadOptionError(
                    "max_memory", "applies to an automatic device_map (auto, balanced, ...)"
                )
            return cls(torch.device("cpu"))
        resolved = resolve_device_map(model, device_map, max_memory)
        names = [name for name, _ in (*model.named_parameters(), *model.named_buffers())]
        devices = set(tensor_devices(resolved, names).values())
        if len(devices) == 1:
            return cls(devices.pop())
        return cls(torch.device("cpu"), resolved)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.device] | None:
        """Each of ``names`` -> its device, under a map over several devices (``None``: all on ``default``)."""
        return None if self.device_map is None else tensor_devices(self.device_map, names)

    def device_of(self, name: str) -> torch.device:
        """The device of tensor ``name`` (a buffer no checkpoint holds, too)."""
        found = device_of(self.device_map, name) if self.device_map else None
        return found or self.default
