"""Merging LoRA into a sharded (FSDP2) model, shard by shard: each rank merges the rows it holds.

PEFT's merge adds ``B @ A * scaling`` to ``base_layer.weight`` in place. Under FSDP2 every one of those is a
``DTensor`` ``Shard(0)`` at rest, and an FP8-resident base holds ``uint8`` codes whose rows are on several
ranks; dequantizing such a parameter reads a data pointer it does not have. Here each rank takes, for every
LoRA ``Linear`` whose base weight is sharded by rows:

* its rows of the base weight: an :class:`~automodel_plugins.model.fp8_linear.Fp8Linear`'s local codes
  dequantized with the matching rows of the (replicated) scale grid, the loader's own ``dequantize`` over a
  region; a plain ``nn.Linear``'s local rows as they are;
* the same rows of ``lora_B`` (sharded by rows like the weight, ``out`` rows each) and the whole ``lora_A``
  (``[r, in]``, gathered: ``r`` rows, a few KiB);
* PEFT's own arithmetic on them (``get_delta_weight``: fp32 for a half-precision adapter on CPU, ``B @ A``, times
  the scaling, back to the adapter's dtype, added in place), which is row-wise: the rows equal those of a
  one-process merge;

and replaces the LoRA layer with a stock ``nn.Linear`` whose weight is a ``DTensor`` of the merged rows, on the
same mesh and placements; an FP8 base's layer joins the config's ``modules_to_not_convert``, as in every merge
(:meth:`~automodel_plugins.model.fp8_resident.Fp8Resident.mark_fp8`). ``automodel_plugins.save_pretrained`` from
every rank then writes the merged model.
Every rank must call this together (gathering ``lora_A`` is a collective).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.placement import is_dtensor, local_region

__all__ = ["merge_sharded_lora_layers"]


def merge_sharded_lora_layers(
    model: nn.Module, *, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> list[str]:
    """Merge every LoRA ``Linear`` of ``model`` whose base weight is a ``DTensor`` into a stock ``nn.Linear``
    holding this rank's merged rows (see the module doc); returns their module names. Other LoRA layers are
    left to PEFT's ``merge_and_unload``. FSDP2 units are resharded first, so every parameter is at rest."""
    _reshard(model)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear) and is_dtensor(module.get_base_layer().weight)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        merged = _merged_linear(name, layer, safe_merge=safe_merge, adapter_names=adapter_names)
        setattr(model.get_submodule(parent_name), child, merged)
        base = layer.get_base_layer()
        if isinstance(base, Fp8Linear):
            base.mark_fp8(False)  # the config lists the layer in modules_to_not_convert
    return names


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root unit unsharded after a forward: reshard every unit, so parameters are DTensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _merged_linear(
    name: str, layer: LoraLinear, *, safe_merge: bool, adapter_names: list[str] | None
) -> nn.Linear:
    """A stock ``nn.Linear`` whose weight is the ``DTensor`` of this rank's merged rows of ``layer``."""
    from torch.distributed.tensor import DTensor

    base = layer.get_base_layer()
    weight = base.weight
    rows = _row_range(name, weight)
    rows_here = rows[1] - rows[0]
    if isinstance(base, Fp8Linear):
        local = weight.to_local().view(base.fp8_dtype)
        region = (slice(*rows), slice(0, base.in_features))
        values = dequantize(
            local,
            base.weight_scale_inv,
            dtype=base.compute_dtype,
            block_size=base.block_size,
            region=region if base.block_size is not None else None,
            key=f"{name}.weight",
        )
    else:
        values = weight.to_local().detach().clone()
    for adapter in check_adapters_to_merge(layer, adapter_names):
        if adapter not in layer.lora_A:
            continue
        if layer.lora_variant.get(adapter) is not None or layer.lora_bias[adapter] or layer.fan_in_fan_out:
            raise NotImplementedError(
                f"{name}: merging a sharded LoRA layer supports plain LoRA only (no DoRA or other variant, "
                "lora_bias or fan_in_fan_out)"
            )
        delta = _delta_rows(name, layer, adapter, rows)
        if safe_merge:
            values = values + delta.to(values.dtype)
            if rows_here and not bool(torch.isfinite(values).all()):
                raise ValueError(
                    f"NaNs detected in the merged weights of {name}. The adapter {adapter} seems to be broken"
                )
        else:
            values += delta
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    merged = DTensor.from_local(
        values, weight.device_mesh, weight.placements, shape=weight.shape, stride=_contiguous_stride(weight)
    )
    linear.weight = nn.Parameter(merged, requires_grad=False)
    if base.bias is not None:
        linear.bias = base.bias
    return linear


def _delta_rows(name: str, layer: LoraLinear, adapter: str, rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows`` of PEFT's ``get_delta_weight(adapter)``, computed as it computes it."""
    weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if is_dtensor(weight_b):
        if _row_range(name, weight_b) != rows:
            raise NotImplementedError(
                f"{name}: lora_B[{adapter!r}] is not sharded by the rows of the base weight "
                f"({tuple(weight_b.placements)!r}); shard both with FSDP2's Shard(0)"
            )
        weight_b = weight_b.to_local()
    else:
        weight_b = weight_b[rows[0] : rows[1]]
    if is_dtensor(weight_a):
        weight_a = weight_a.full_tensor()
    dtype = weight_b.dtype
    cast_to_fp32 = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad():
        if cast_to_fp32:
            weight_a, weight_b = weight_a.float(), weight_b.float()
        delta = weight_b @ weight_a
        delta.mul_(layer.scaling[adapter])
        return delta.to(dtype) if cast_to_fp32 else delta


def _row_range(name: str, tensor: Any) -> tuple[int, int]:
    """The rows of the 2-D ``tensor`` this rank holds, refusing a shard that is not a run of whole rows."""
    region = local_region(tensor)
    rows, cols = tensor.shape
    if region is None:
        return 0, rows
    if (region[1].start, region[1].stop) != (0, cols):
        raise NotImplementedError(
            f"{name}: merging LoRA shard by shard needs weights sharded by rows (FSDP2's Shard(0)); this one is "
            f"placed as {tuple(tensor.placements)!r}"
        )
    return region[0].start, region[0].stop


def _contiguous_stride(tensor: torch.Tensor) -> tuple[int, ...]:
    stride, total = [], 1
    for size in reversed(tensor.shape):
        stride.append(total)
        total *= size
    return tuple(reversed(stride))
