"""What transformers' ``save_pretrained`` writes for a model: which of its tensors, under which keys, in which order.

Saving in transformers' own layout (``quantization="none"`` and the FP8 formats) must give the keys a stock
``from_pretrained`` expects: tied tensors once (the tie's source, as ``remove_tied_weights_from_state_dict``
keeps), ``_keys_to_ignore_on_save`` left out, and the model's conversion mapping run backwards
(``revert_weight_conversion``: Mistral3's runtime ``model.language_model.*`` goes back to the legacy
``language_model.model.*``), which also fixes the order files are filled in. Nothing here touches tensor data:
the mapping runs on meta stand-ins of the names given. ``linear_weights`` finds the weights transformers' FP8
format quantizes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from automodel_plugins.errors import SaveError
from automodel_plugins.model.fp8_experts import EXPERT_PROJECTIONS, Fp8Experts, fp8_experts_modules
from automodel_plugins.model.fp8_linear import ACTIVATION_NAME, SCALE_NAME, Fp8Linear, fp8_linear_modules
from automodel_plugins.model.tensors import model_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["linear_weights", "resident_modules", "saved_tensors", "transformers_keys"]


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` holds, by name, in state-dict order: parameters and persistent
    buffers, a tied tensor once under its tie's source name, ``_keys_to_ignore_on_save`` left out.

    An FP8-resident layer (:class:`~automodel_plugins.model.fp8_linear.Fp8Linear`) counts as the linear it
    stands for: its weight (the FP8 codes, valued through :func:`resident_modules`), not its scale buffer,
    which the save's scale policy writes itself, nor its static activation scale (the source format carries the
    source's, the other formats declare dynamic activations); FP8-resident experts
    (:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`) likewise count as their fused tensors.
    """
    tensors = model_tensors(model)
    linear_scales = (SCALE_NAME, ACTIVATION_NAME)
    experts_scales = (*Fp8Experts.SCALE_NAMES, *Fp8Experts.ACTIVATION_NAMES)
    scales = {_join(name, scale) for name in fp8_linear_modules(model) for scale in linear_scales}
    scales |= {_join(name, scale) for name in fp8_experts_modules(model) for scale in experts_scales}
    tensors = {name: tensor for name, tensor in tensors.items() if name not in scales}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in tensors and source not in tensors and _same(model, target, source):
            tensors = {source if name == target else name: value for name, value in tensors.items()}
    ignored = getattr(model, "_keys_to_ignore_on_save", None) or ()
    return {name: t for name, t in tensors.items() if name not in ignored}


def resident_modules(model: nn.Module) -> dict[str, Fp8Linear | Fp8Experts]:
    """``weight name -> module`` of every FP8-resident layer's weight and FP8-resident experts' fused tensors:
    a save values these by their dequantized values."""
    out: dict[str, Fp8Linear | Fp8Experts] = {
        _join(name, "weight"): module for name, module in fp8_linear_modules(model).items()
    }
    for name, module in fp8_experts_modules(model).items():
        out.update({_join(name, projection): module for projection in EXPERT_PROJECTIONS})
    return out


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def linear_weights(model: nn.Module) -> dict[str, str]:
    """``weight name -> module name`` of every plain ``nn.Linear`` (as transformers' FP8 loader converts them,
    also when FSDP2 made its class ``FSDPLinear``), FP8-resident layers included."""
    out = {}
    for name, module in model.named_modules():
        kind = type(module)
        plain = (
            kind is nn.Linear
            or isinstance(module, Fp8Linear)
            or (kind.__name__ == "FSDPLinear" and nn.Linear in kind.__mro__[1:3])
        )
        if plain and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{name}.weight" if name else "weight"] = name
    return out


def _unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    """``model``, or, when FSDP2 renamed its classes (``FSDPMistral3ForConditionalGeneration``: transformers
    finds a model's conversions by class name), the stock class on meta in its place, built from a copy of the
    config: transformers' ``_from_config`` writes the build dtype into the config it is given and into every
    sub-config, and the model's own config then named bfloat16 for an fp32 model (the saved ``config.json``
    too, whose sub-configs ``from_pretrained(dtype="auto")`` reads)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return model
    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        return model
    from automodel_plugins.model.stock import build_on_meta

    stand_in = build_on_meta(copy.deepcopy(model.config), torch.bfloat16)
    if hasattr(model, "_weight_conversions"):
        stand_in._weight_conversions = model._weight_conversions
    return stand_in


def _same(model: nn.Module, first: str, second: str) -> bool:
    try:
        return model.get_parameter(first) is model.get_parameter(second)
    except AttributeError:
        return False


def transformers_keys(
    model: PreTrainedModel, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
    """``name -> checkpoint key`` for model-side ``names`` (tensors, and the scales beside them), in the order
    ``save_pretrained`` writes them, with the model's weight conversions reverted.

    Raises :class:`SaveError` when those conversions do more than rename (merged or split tensors: the
    streaming writer writes each tensor as it is held).
    """
    from transformers.core_model_loading import revert_weight_conversion

    stand_ins = {name: torch.empty(shapes[name], device="meta") for name in names}
    reverted = revert_weight_conversion(_unwrapped(model), dict(stand_ins))
    by_identity = {id(tensor): name for name, tensor in stand_ins.items()}
    keys = {}
    for key, tensor in reverted.items():
        name = by_identity.get(id(tensor))
        if name is None or tensor.shape != stand_ins[name].shape:
            raise SaveError(
                f"{type(model).__name__}'s weight conversions change tensors on save (checkpoint key {key!r}), "
                "not only their names; save it with model.save_pretrained"
            )
        keys[name] = key
    if len(keys) != len(stand_ins):
        missing = sorted(set(stand_ins) - set(keys))
        raise SaveError(f"{type(model).__name__}'s weight conversions drop tensors on save: {missing[:5]}")
    return keys
