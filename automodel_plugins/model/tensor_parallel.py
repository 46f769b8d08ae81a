"""Tensor parallelism from the model's own plan: transformers' ``tp_plan`` (``base_model_tp_plan`` of each
sub-model, e.g. Ministral 3's q/k/v/gate/up ``colwise``, o/down ``rowwise``) turned into torch's
``ColwiseParallel`` / ``RowwiseParallel`` for ``parallelize_module``, module by module.

Only the ``colwise`` and ``rowwise`` entries are applied (the decoder's projections, FP8-resident or not);
the plan's other entries (a row-wise embedding, a gathered ``lm_head``) are left out, so those modules stay
replicated. Under PEFT LoRA (applied first, on meta), a tuner layer's base layer takes the layer's style and its
adapters the one that keeps the sum local: column-wise, ``lora_B`` is split by rows like the base weight
(``lora_A`` replicated: its input gradient comes back summed through ``lora_B``'s input hook); row-wise,
``lora_A`` is split by columns like the base weight (its output summed), ``lora_B`` replicated.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from automodel_plugins.model.tensors import unwrap_peft

__all__ = ["parallelize_fp8", "pattern_of", "tensor_parallel_plan"]

STYLES = ("colwise", "rowwise")


def _styles(model: nn.Module) -> dict[str, str]:
    """The model's ``tp_plan`` (module pattern -> style), ``colwise``/``rowwise`` entries only."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    return {pattern: style for pattern, style in dict(plan).items() if style in STYLES}


def pattern_of(pattern: str) -> re.Pattern[str]:
    """A plan's module pattern (``layers.*.mlp``: ``*`` any layer index) as a regex for ``fullmatch``."""
    return re.compile(r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in pattern.split(".")))


def tensor_parallel_plan(model: nn.Module) -> dict[str, Any]:
    """Module name (in ``model``, a PEFT model included) -> ``ColwiseParallel()`` / ``RowwiseParallel()``, from
    the transformers model's ``tp_plan``; empty when it has none."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    base = unwrap_peft(model)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    prefix = f"{prefix}." if prefix else ""
    patterns = [(pattern_of(p), style) for p, style in _styles(base).items()]
    plan: dict[str, Any] = {}
    for name, module in base.named_modules():
        style = next((s for p, s in patterns if p.fullmatch(name)), None)
        if style is None:
            continue
        make = ColwiseParallel if style == "colwise" else RowwiseParallel
        tuner = isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A")
        if not tuner:
            plan[prefix + name] = make()
            continue
        plan[f"{prefix}{name}.base_layer"] = make()
        split = module.lora_B if style == "colwise" else module.lora_A
        for adapter in split:
            plan[f"{prefix}{name}.{'lora_B' if style == 'colwise' else 'lora_A'}.{adapter}"] = make()
    return plan


def parallelize_fp8(model: nn.Module, mesh: Any) -> dict[str, str]:
    """``parallelize_module(model, mesh, tensor_parallel_plan(model))`` on a 1-D ``mesh``: FP8-resident layers
    (:class:`~automodel_plugins.model.fp8_linear.Fp8Linear`) included, their codes split, their scales whole.
    Call it on the model built on meta (after PEFT, if any), then ``to_empty`` and ``load_weights``: each
    rank reads only its rows or columns. Returns module name -> style applied."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tensor_parallel_plan(model)
    parallelize_module(model, mesh, plan)
    return {name: type(style).__name__ for name, style in plan.items()}
