"""Re-quantize float weights for an FP8-resident model, deliberately: the one route from a BF16 (or fp32) state
dict into :class:`~automodel_plugins.model.fp8_linear.Fp8Linear` / ``Fp8Experts`` codes.

``load_state_dict`` refuses a float value for FP8 codes (a cast would make meaningless codes); a caller who means
to store those weights in FP8 calls::

    model.load_state_dict(automodel_plugins.requantize_state_dict(model, state_dict))

Each float weight of a resident module is encoded in that module's FP8 format, block size and scale dtype under
the save path's scale policy (:func:`~automodel_plugins.fp8.scale_policy.choose_scale`): the scale the state
dict gives beside it, else the module's current scale, is kept where the values still fit it, and a fresh
``amax / fp8_max`` is taken where they do not. So the dequantized weights of the same checkpoint come back as
the checkpoint's own bytes, and weights moved past their scale get a fresh one (one per block).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from automodel_plugins.errors import NonFiniteWeightError
from automodel_plugins.fp8.amax import block_amax, tensor_amax
from automodel_plugins.fp8.encode import encode
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scale_policy import choose_scale
from automodel_plugins.fp8.scales import decode_scale, grid_shape
from automodel_plugins.fp8.stacked import stacked_block_amax, stacked_encode
from automodel_plugins.model.fp8_resident import Fp8Resident, modules_of_type
from automodel_plugins.model.placement import is_dtensor

__all__ = ["requantize_state_dict", "requantize_values"]


def requantize_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` in which every float (non-FP8) value for the codes of an FP8-resident module of
    ``model`` is replaced by its FP8 codes, and its scale key by the scale they were encoded with; every other
    entry is passed through as it is. Keys are ``model``'s own (``model.state_dict()``'s)."""
    out = dict(state_dict)
    for name, module in modules_of_type(model, Fp8Resident).items():
        for code_name, scale_name in zip(module.CODE_NAMES, module.SCALE_NAMES, strict=True):
            key, scale_key = _key(name, code_name), _key(name, module.state_key(scale_name))
            values = state_dict.get(key)
            if (
                not isinstance(values, torch.Tensor)
                or not values.dtype.is_floating_point
                or is_fp8(values.dtype)
            ):
                continue
            if is_dtensor(values):
                raise NotImplementedError(
                    f"{key}: re-quantizing a sharded (DTensor) value is not supported; pass full tensors "
                    "(e.g. get_model_state_dict(..., options=StateDictOptions(full_state_dict=True)))"
                )
            source = state_dict.get(scale_key)
            if not isinstance(source, torch.Tensor):
                source = module.get_buffer(scale_name)
            out[key], out[scale_key] = requantize_values(module, key, values.detach(), source)
    return out


def _key(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def requantize_values(
    module: Fp8Resident, key: str, values: torch.Tensor, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (one weight, or a stack of expert matrices) encoded in ``module``'s FP8 dtype, block size and
    scale dtype: ``(codes in the FP8 dtype, stored scale)``. Each scale is ``source``'s where the values still
    fit it, else fresh (``amax / fp8_max``); ``source=None``: every scale fresh."""
    block = module.block_size
    stacked = values.dim() > 2
    if block is None:
        amax = tensor_amax(values)
    elif stacked:
        grid = tuple(values.shape[:-2]) + grid_shape(tuple(values.shape[-2:]), block)
        amax = stacked_block_amax(values, block, grid, origin=(0,) * values.dim())
    else:
        amax = block_amax(values, block, grid_shape(tuple(values.shape), block))
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError("holds NaN or inf values: it cannot be re-quantized to FP8", key=key)
    if source is not None and source.numel() != amax.numel():
        source = None  # a scale of another layout: every scale fresh (load_state_dict checks the shape)
    choice = choose_scale(
        amax,
        source=None if source is None else source.reshape(amax.shape),
        scale_dtype=module.scale_dtype,
        fp8_dtype=module.fp8_dtype,
    )
    scale = decode_scale(choice.stored)
    if stacked:
        codes = stacked_encode(
            values, scale, fp8_dtype=module.fp8_dtype, block_size=block, origin=(0,) * values.dim()
        )
    else:
        codes = encode(values, scale, fp8_dtype=module.fp8_dtype, block_size=block)
    return codes, choice.stored
