"""Tensor parallelism from the model's own plan: transformers' ``tp_plan`` (``base_model_tp_plan`` of each
sub-model, e.g. Ministral 3's q/k/v/gate/up ``colwise``, o/down ``rowwise``) turned into torch's
``ColwiseParallel`` / ``RowwiseParallel`` for ``parallelize_module``, module by module.

Only the ``colwise`` and ``rowwise`` entries are applied (the decoder's projections, FP8-resident or not);
the plan's other entries (a row-wise embedding, a gathered ``lm_head``) are left out, so those modules stay
replicated. Under PEFT LoRA (applied first, on meta), a tuner layer's base layer takes the layer's style and its
adapters the one that keeps the sum local: column-wise, ``lora_B`` is split by rows like the base weight
(``lora_A`` replicated: its input gradient comes back summed through ``lora_B``'s input hook); row-wise,
``lora_A`` is split by columns like the base weight (its output summed), ``lora_B`` replicated.

A module between a column-wise and a row-wise split of one parent (Qwen3's per-head ``q_norm`` / ``k_norm`` in
the attention, between ``q_proj``/``k_proj`` and ``o_proj``) stays replicated but sees only this rank's shard of
the activations, so its parameters' gradients are each rank's part of the whole (transformers'
``replicated_with_grad_allreduce``). :func:`parallelize_fp8` finds them from the plan and sums their gradient
over the mesh in a gradient hook, once per backward and before it is accumulated into ``.grad`` (so gradient
accumulation over micro-batches sums each batch once; transformers' post-accumulate hook re-sums the earlier
batches').
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from automodel_plugins.model.tensors import unwrap_peft

__all__ = ["parallelize_fp8", "partial_gradient_modules", "pattern_of", "tensor_parallel_plan"]

STYLES = ("colwise", "rowwise")


def _styles(model: nn.Module) -> dict[str, str]:
    """The model's ``tp_plan`` (module pattern -> style), ``colwise``/``rowwise`` entries only."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    return {pattern: style for pattern, style in dict(plan).items() if style in STYLES}


def pattern_of(pattern: str) -> re.Pattern[str]:
    """A plan's module pattern (``layers.*.mlp``: ``*`` any layer index) as a regex for ``fullmatch``."""
    return re.compile(r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in pattern.split(".")))


def _matched(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name in ``model``, module, style) of each module the base model's ``tp_plan`` splits."""
    base = unwrap_peft(model)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    prefix = f"{prefix}." if prefix else ""
    patterns = [(pattern_of(p), style) for p, style in _styles(base).items()]
    for name, module in base.named_modules():
        style = next((s for p, s in patterns if p.fullmatch(name)), None)
        if style is not None:
            yield prefix + name, module, style


def tensor_parallel_plan(model: nn.Module) -> dict[str, Any]:
    """Module name (in ``model``, a PEFT model included) -> ``ColwiseParallel()`` / ``RowwiseParallel()``, from
    the transformers model's ``tp_plan``; empty when it has none."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for name, module, style in _matched(model):
        make = ColwiseParallel if style == "colwise" else RowwiseParallel
        tuner = isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A")
        if not tuner:
            plan[name] = make()
            continue
        plan[f"{name}.base_layer"] = make()
        split = module.lora_B if style == "colwise" else module.lora_A
        for adapter in split:
            plan[f"{name}.{'lora_B' if style == 'colwise' else 'lora_A'}.{adapter}"] = make()
    return plan


def partial_gradient_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module, for each module with parameters that the plan leaves replicated but places between a
    column-wise and a row-wise split of the same parent (its input is this rank's shard of the activations):
    each rank's gradient of its parameters is a part of the whole."""
    styles: dict[str, set[str]] = {}
    split: set[str] = set()
    for name, _, style in _matched(model):
        split.add(name)
        styles.setdefault(name.rpartition(".")[0], set()).add(style)
    found: dict[str, nn.Module] = {}
    for parent, kinds in styles.items():
        if kinds != set(STYLES):
            continue  # no region between a column-wise and a row-wise split here
        for child, module in model.get_submodule(parent).named_children():
            name = f"{parent}.{child}" if parent else child
            if name not in split and any(True for _ in module.parameters()):
                found[name] = module
    return found


def _sum_gradient_over(group: Any) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total

    return hook


def _reduce_gradients_over(module: nn.Module, mesh: Any) -> None:
    """Sum the gradients of ``module``'s trainable parameters over ``mesh`` in each backward. The hooks go on
    at a forward with gradients on, on the parameter objects then in place: ``to_empty``, the load and FSDP2
    swap parameter objects, and frozen ones (PEFT) need none."""
    group = mesh.get_group()
    hooked: dict[str, nn.Parameter] = {}

    def pre_hook(module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for name, param in module.named_parameters():
            if param.requires_grad and hooked.get(name) is not param:
                param.register_hook(_sum_gradient_over(group))
                hooked[name] = param

    module.register_forward_pre_hook(pre_hook)


def parallelize_fp8(model: nn.Module, mesh: Any) -> dict[str, str]:
    """``parallelize_module(model, mesh, tensor_parallel_plan(model))`` on a 1-D ``mesh``: FP8-resident layers
    (:class:`~automodel_plugins.model.fp8_linear.Fp8Linear`) included, their codes split, their scales whole.
    Call it on the model built on meta (after PEFT, if any), then ``to_empty`` and ``load_weights``: each
    rank reads only its rows or columns. The replicated modules that see only this rank's shard
    (:func:`partial_gradient_modules`) get their gradients summed over ``mesh`` in each backward. Returns
    module name -> style applied (``"ReplicateWithGradientSum"`` for those)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = tensor_parallel_plan(model)
    partial = partial_gradient_modules(model)
    parallelize_module(model, mesh, plan)
    for module in partial.values():
        _reduce_gradients_over(module, mesh)
    applied = {name: type(style).__name__ for name, style in plan.items()}
    return applied | dict.fromkeys(partial, "ReplicateWithGradientSum")
