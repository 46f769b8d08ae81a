"""Warn once when an optimizer steps an FP8-resident model (``dequantize=False``) whose FP8 layers all stay
frozen with no adapter: such a step trains only the tensors that are not FP8 (embeddings, norms, the head),
which is almost never what was meant (LoRA forgotten, or ``dequantize=False`` where a full fine-tune was).

The check is an optimizer step pre-hook registered once, process-wide
(``torch.optim.optimizer.register_optimizer_step_pre_hook``), which sees every optimizer, whoever built it
(a plain loop, HF ``Trainer``, TRL, accelerate). Models loaded with ``dequantize=False`` are remembered weakly;
the first step of an optimizer holding any of a model's parameters decides for that model, once: it warns
(:class:`~automodel_plugins.errors.FrozenFp8BaseWarning`) or not, and the model is forgotten. Later steps cost
one emptiness test. An FP8 layer counts as trained when it has a trainable parameter of its own (a bias) or
a module holding it as ``base_layer`` (PEFT's LoRA and other tuner layers) has one.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from automodel_plugins.errors import FrozenFp8BaseWarning
from automodel_plugins.model.fp8_resident import Fp8Resident

__all__ = ["fp8_layers_without_training", "watch_resident_training"]

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HANDLE: RemovableHandle | None = None


def watch_resident_training(model: nn.Module) -> None:
    """Remember ``model`` (FP8-resident) until the first optimizer step over its parameters decides."""
    global _HANDLE
    _WATCHED.add(model)
    if _HANDLE is None:
        _HANDLE = register_optimizer_step_pre_hook(_before_step)


def fp8_layers_without_training(model: nn.Module) -> tuple[int, bool]:
    """``(FP8-resident modules, whether any of them is trained)``: by a trainable parameter of its own, or
    through a trainable module that holds it as ``base_layer``."""
    resident = [m for m in model.modules() if isinstance(m, Fp8Resident)]
    trained = {id(m) for m in resident if any(p.requires_grad for p in m.parameters())}
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, Fp8Resident) and any(p.requires_grad for p in module.parameters()):
            trained.add(id(base))
    return len(resident), bool(trained)


def _before_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    if not _WATCHED:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_WATCHED):
        if not any(id(p) in stepped for p in model.parameters()):
            continue
        _WATCHED.discard(model)
        layers, trained = fp8_layers_without_training(model)
        if layers and not trained:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            warnings.warn(
                f"{type(optimizer).__name__}.step() on an FP8-resident model (dequantize=False) whose {layers} "
                f"FP8 layers are all frozen with no adapter: it trains only the {trainable:,} parameters that "
                "are not FP8 (embeddings, norms, the head). Put LoRA on the FP8 layers (peft.get_peft_model with "
                "target_modules naming them), or load with dequantize=True for a full fine-tune",
                FrozenFp8BaseWarning,
                stacklevel=3,
            )
