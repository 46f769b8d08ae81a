"""FP8 residency (``dequantize=False``): which modules keep their checkpoint FP8 weights, and the swap.

The rule, shared by the loader and ``inspect`` (:func:`plan_resident`): a layer becomes an
:class:`~automodel_plugins.model.fp8_linear.Fp8Linear` exactly when it is a plain ``nn.Linear`` whose (untied)
weight the checkpoint stores as FP8 with a scale, i.e. when the adapter's
:class:`~automodel_plugins.adapters.TensorSource` says ``is_fp8``. A transformers fused-experts module (a MoE
layer's ``experts``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) becomes an
:class:`~automodel_plugins.model.fp8_experts.Fp8Experts` when both its tensors can be kept FP8 as stored
(:func:`~automodel_plugins.pipeline.load.plan.residency_misfit`: block FP8 pieces aligned on the blocks); when
only one can, both are dequantized. So ``modules_to_not_convert`` (the vision tower, the projector, ``lm_head``,
the routers) stay in the model's dtype, and FP8 tensors of other modules (embeddings; experts that do not fit)
are dequantized as usual, each with a ``note`` in the plan saying why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from automodel_plugins.errors import NotQuantizedError
from automodel_plugins.fp8.formats import ACTIVATION_SCALE_SUFFIXES
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_experts import (
    EXPERT_PROJECTIONS,
    Fp8Experts,
    fp8_experts_modules,
    fused_experts_shapes,
)
from automodel_plugins.model.fp8_linear import ACTIVATION_NAME, SCALE_NAME, Fp8Linear, fp8_linear_modules
from automodel_plugins.model.fp8_resident import check_resident_state_dict
from automodel_plugins.model.quantization_record import track_quantization
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.readers import activation_scale_key

if TYPE_CHECKING:
    from automodel_plugins.adapters import StateDictAdapter, TensorSource
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.load.plan import LoadPlan

__all__ = [
    "SIBLING_NOTE",
    "loadable_tensors",
    "make_fp8_resident",
    "plan_resident",
    "residency_candidates",
    "resident_weights",
]


SIBLING_NOTE = ", so neither can the other fused tensor of its experts"


def _experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fused-experts modules :class:`Fp8Experts` can stand in for, by module name."""
    return {
        name: module for name, module in model.named_modules() if fused_experts_shapes(module) is not None
    }


def residency_candidates(model: nn.Module) -> set[str]:
    """Tensors that may stay FP8: the weights of plain ``nn.Linear`` layers, unless tied to another tensor,
    and the fused tensors of experts modules."""
    return _candidates(model, _experts_modules(model))


def _candidates(model: nn.Module, experts_modules: Mapping[str, nn.Module]) -> set[str]:
    """:func:`residency_candidates`, given the model's experts modules."""
    names = model_tensors(model)
    linears = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is nn.Linear and f"{name}.weight" in names
    }
    experts = {f"{name}.{p}" for name in experts_modules for p in EXPERT_PROJECTIONS}
    return linears | (experts & set(names))


def resident_weights(model: nn.Module) -> set[str]:
    """Weights of the model's FP8-resident modules (model names): they can only be loaded from FP8 data."""
    linears = {f"{name}.weight" for name in fp8_linear_modules(model)}
    return linears | {f"{name}.{p}" for name in fp8_experts_modules(model) for p in EXPERT_PROJECTIONS}


def plan_resident(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    adapter: StateDictAdapter,
    checkpoint: Checkpoint,
    *,
    sources: Mapping[str, TensorSource] | None = None,
    checked: set[str] | None = None,
) -> LoadPlan:
    """The ``dequantize=False`` plan of ``tensors`` (the model's, by name): residency candidates whose FP8 data
    fits kept FP8, except an experts module's tensor whose sibling cannot be (then both are dequantized).
    ``sources``, ``checked``: the adapter's answers and the tensors already checked (see :func:`plan_load`)."""
    experts_modules = _experts_modules(model)
    plan = plan_load(
        tensors,
        adapter,
        checkpoint,
        keep_fp8=_candidates(model, experts_modules),
        sources=sources,
        checked=checked,
    )
    for name in experts_modules:
        names = [f"{name}.{p}" for p in EXPERT_PROJECTIONS]
        if not all(n in plan for n in names):
            continue
        kept = [n for n in names if plan[n].action == "kept_fp8"]
        if not kept:
            continue
        if len(kept) == len(names):
            misfit = _activation_misfit([plan[n].source for n in names])
            if misfit is None:
                continue
            why = f"{name}: {misfit}"
        else:
            (other,) = (n for n in names if n not in kept)
            why = f"{other} cannot stay FP8 ({plan[other].note or 'not FP8'}){SIBLING_NOTE}"
        for n in kept:
            dtype = tensors[n].dtype
            plan.tensors[n] = dataclasses.replace(
                plan[n], dtype=dtype, action="dequantized", scale_numel=0, note=why
            )
    return plan


def _activation_misfit(sources: list[TensorSource]) -> str | None:
    """Why experts' static activation scales cannot be kept as transformers' ``FP8Experts`` holds them (one
    ``[E]`` tensor per fused projection, both or neither), else None. Experts that cannot keep them are
    dequantized (and so listed in ``modules_to_not_convert``) rather than saved FP8 under a static config
    without their activation scales."""
    keys = [[k for k in s.dropped_keys if k.endswith(ACTIVATION_SCALE_SUFFIXES)] for s in sources]
    if not any(keys):
        return None
    if any(len(s.parts()) > 1 for s in sources):
        return "static activation scales stored per expert piece cannot be kept as one per fused expert"
    if not all(keys):
        return "static activation scales stored for one fused projection but not the other"
    return None


def loadable_tensors(model: nn.Module, names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a load plans, by stock name (``names``: stock name -> model name, see
    :func:`~automodel_plugins.model.tensors.stock_names`; default: the model's own names). An FP8-resident
    layer's scale arrives with its weight, not on its own."""
    tensors = model_tensors(model)
    names = names if names is not None else {name: name for name in tensors}
    scales = {
        f"{name}.{scale}" for name in fp8_linear_modules(model) for scale in (SCALE_NAME, ACTIVATION_NAME)
    }
    experts_scales = (*Fp8Experts.SCALE_NAMES, *Fp8Experts.ACTIVATION_NAMES)
    scales |= {f"{name}.{scale}" for name in fp8_experts_modules(model) for scale in experts_scales}
    return {stock: tensors[name] for stock, name in names.items() if name not in scales}


def make_fp8_resident(model: nn.Module, plan: LoadPlan, checkpoint: Checkpoint) -> list[str]:
    """Swap every layer whose weight ``plan`` keeps FP8 for an :class:`Fp8Linear`, and every experts module
    whose fused tensors it keeps FP8 for an :class:`Fp8Experts`, on meta (weights to be streamed in), and
    return the module names in module order. Nothing kept: :class:`NotQuantizedError` naming the checkpoint."""
    kept = [name for name, planned in plan.items() if planned.action == "kept_fp8"]
    if not kept:
        quantization = quantization_dict(model.config) if hasattr(model, "config") else None
        why = "its config declares no quantization_config" if quantization is None else "none is FP8"
        raise NotQuantizedError(
            f"dequantize=False keeps the checkpoint's FP8 linear weights in FP8, but no linear weight is FP8 "
            f"with a scale here ({why}); load it with dequantize=True (the default)",
            path=checkpoint.directory,
        )
    layers = _make_experts_resident(model, plan, checkpoint)
    for weight_name in kept:
        if not weight_name.endswith(".weight"):
            continue  # an experts module's fused tensor
        layer_name = weight_name.removesuffix(".weight")
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        planned = plan[weight_name]
        piece = planned.source.parts()[0]  # the stored tensor (one, maybe with its rows in rotary order)
        resident = Fp8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=piece.block_size,
            fp8_dtype=planned.dtype,
            compute_dtype=linear.weight.dtype,
            scale_dtype=checkpoint.info(piece.scale_key).dtype,
            static_activation=activation_scale_key(planned.source) is not None,
            device="meta",
        )
        if linear.bias is not None:
            resident.bias = linear.bias  # the same (meta) parameter: it is planned and streamed as before
        setattr(parent, child, resident)
        layers.append(layer_name)
    model.register_load_state_dict_pre_hook(check_resident_state_dict)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    layers.sort(key=order.__getitem__)
    # the config names FP8 exactly what stays FP8, now and after any LoRA merge or unmerge
    dequantized = {
        name.rpartition(".")[0] for name, planned in plan.items() if planned.action == "dequantized"
    }
    track_quantization(
        model, layers, dequantized_at_load=sorted(dequantized & order.keys(), key=order.__getitem__)
    )
    return layers


def _make_experts_resident(model: nn.Module, plan: LoadPlan, checkpoint: Checkpoint) -> list[str]:
    """Swap the experts modules whose fused tensors ``plan`` keeps FP8 for :class:`Fp8Experts` on meta."""
    swapped = []
    for name, module in _experts_modules(model).items():
        planned = [plan.get(f"{name}.{p}") for p in EXPERT_PROJECTIONS]
        if not all(p is not None and p.action == "kept_fp8" for p in planned):
            continue
        piece = planned[0].source.parts()[0]
        parent_name, _, child = name.rpartition(".")
        resident = Fp8Experts.replacing(
            module,
            block_size=piece.block_size,
            fp8_dtype=planned[0].dtype,
            scale_dtype=checkpoint.info(piece.scale_key).dtype,
            static_activation=activation_scale_key(planned[0].source) is not None,  # both or neither: planned
        )
        setattr(model.get_submodule(parent_name), child, resident)
        swapped.append(name)
    return swapped
