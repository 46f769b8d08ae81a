"""FP8 residency (``dequantize=False``): which linear layers keep their checkpoint FP8 weight, and the swap.

The rule, shared by the loader and ``inspect``: a layer becomes an :class:`~automodel_plugins.model.fp8_linear.
Fp8Linear` exactly when it is a plain ``nn.Linear`` whose (untied) weight the checkpoint stores as FP8 with a
scale, i.e. when the adapter's :class:`~automodel_plugins.adapters.TensorSource` says ``is_fp8``. So
``modules_to_not_convert`` (the vision tower, the projector, ``lm_head``) stay in the model's dtype, and FP8
tensors of other modules (embeddings, fused MoE experts) are dequantized as usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from automodel_plugins.errors import NotQuantizedError
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_linear import SCALE_NAME, Fp8Linear, fp8_linear_modules
from automodel_plugins.model.tensors import model_tensors

if TYPE_CHECKING:
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.plan import LoadPlan

__all__ = [
    "loadable_tensors",
    "make_fp8_resident",
    "residency_candidates",
    "resident_weights",
]


def residency_candidates(model: nn.Module) -> set[str]:
    """Weights that may stay FP8: those of plain ``nn.Linear`` layers, unless tied to another tensor."""
    names = model_tensors(model)
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is nn.Linear and f"{name}.weight" in names
    }


def resident_weights(model: nn.Module) -> set[str]:
    """Weights of the model's FP8-resident layers (model names): they can only be loaded from FP8 data."""
    return {f"{name}.weight" for name in fp8_linear_modules(model)}


def loadable_tensors(model: nn.Module, names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a load plans, by stock name (``names``: stock name -> model name, see
    :func:`~automodel_plugins.model.tensors.stock_names`; default: the model's own names). An FP8-resident
    layer's scale arrives with its weight, not on its own."""
    tensors = model_tensors(model)
    names = names if names is not None else {name: name for name in tensors}
    scales = {f"{name}.{SCALE_NAME}" for name in fp8_linear_modules(model)}
    return {stock: tensors[name] for stock, name in names.items() if name not in scales}


def make_fp8_resident(model: nn.Module, plan: LoadPlan, checkpoint: Checkpoint) -> list[str]:
    """Swap every layer whose weight ``plan`` keeps FP8 for an :class:`Fp8Linear` on meta (weights to be
    streamed in), and return the layer names in module order. No such layer: :class:`NotQuantizedError`
    naming the checkpoint."""
    kept = [name for name, planned in plan.items() if planned.action == "kept_fp8"]
    if not kept:
        quantization = quantization_dict(model.config) if hasattr(model, "config") else None
        why = "its config declares no quantization_config" if quantization is None else "none is FP8"
        raise NotQuantizedError(
            f"dequantize=False keeps the checkpoint's FP8 linear weights in FP8, but no linear weight is FP8 "
            f"with a scale here ({why}); load it with dequantize=True (the default)",
            path=checkpoint.directory,
        )
    layers = []
    for weight_name in kept:
        layer_name = weight_name.removesuffix(".weight")
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        planned = plan[weight_name]
        resident = Fp8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=planned.source.block_size,
            fp8_dtype=planned.dtype,
            compute_dtype=linear.weight.dtype,
            scale_dtype=checkpoint.info(planned.source.scale_key).dtype,
            device="meta",
        )
        if linear.bias is not None:
            resident.bias = linear.bias  # the same (meta) parameter: it is planned and streamed as before
        setattr(parent, child, resident)
        layers.append(layer_name)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(layers, key=order.__getitem__)
