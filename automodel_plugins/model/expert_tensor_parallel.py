"""Expert tensor parallelism (ETP, as vLLM and torchtitan call it) of fused MoE experts, FP8-resident
(:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`) or dequantized (the stock experts module): on a 1-D
``tp`` mesh every rank holds **every** expert's slice of the intermediate dimension (FP8 codes and block-scale
grids together):

* ``gate_up_proj [E, 2I, H]`` (and its grid ``[E, 2I/br, H/bc]``): ``_StridedShard(1, split_factor=2)``, i.e.
  rank ``i``'s rows of the gate half and the matching rows of the up half, so gate and up stay paired and the
  local tensor is ``[E, 2I/tp, H]`` laid out ``gate_i | up_i``, which the forward's ``chunk(2)`` splits right;
* ``down_proj [E, H, I]`` (and its grid): ``Shard(2)``, the matching columns;
* static activation scales ``[E]``: replicated.

Every rank sees the same tokens (tensor parallelism shares one batch) and routes them the same way (the router is
replicated); it runs the experts' own forward on its local tensors, which gives its partial ``down`` output, and
one all-reduce (sum) over ``tp`` completes it. The all-reduce's backward is the identity; the inputs' (hidden
states and routing weights) backward is an all-reduce, so their gradients sum every rank's part (Megatron's
"reduce" and "copy" regions); a dequantized expert's gradient is a DTensor of its slice. The scale grid is split
with its codes, so ``I / tp`` must be a multiple of the block's rows (``gate_up_proj``) and columns
(``down_proj``): a split that would cut a scale block is an
:class:`~automodel_plugins.errors.ExpertTensorParallelError` naming the tensor.

transformers' ``tp_plan``s leave the routed experts out; the attention, shared experts and router are split (or
replicated) by :func:`~automodel_plugins.model.tensor_parallel.parallelize_fp8` from the model's own plan. The
flow: ``build_model`` on meta -> ``parallelize_fp8(model, mesh)`` -> ``parallelize_experts_tp(model, mesh)`` ->
``to_empty`` -> ``load_weights`` (each rank reads only its slices).

Not supported (refused, typed, naming the module): LoRA on the experts (PEFT ``target_parameters``, before the
split or after it: its expert deltas span the whole intermediate dim; use expert parallelism,
:func:`~automodel_plugins.model.expert_parallel.parallelize_experts`), and expert TP with expert parallelism on
one module.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from automodel_plugins.errors import ExpertTensorParallelError
from automodel_plugins.model.expert_parallel import _lora_wrappers, _stock_lora_wrapper, expert_parallel_plan
from automodel_plugins.model.fp8_experts import EXPERT_PROJECTIONS, Fp8Experts, fused_experts_shapes
from automodel_plugins.model.fp8_experts_delta import active_deltas
from automodel_plugins.model.placement import _held_indices, is_dtensor
from automodel_plugins.model.tensors import unwrap_peft

__all__ = ["EXPERT_TP_MESH", "expert_tp_placement", "parallelize_experts_tp"]

EXPERT_TP_MESH = "_expert_tp_mesh"
"""The attribute :func:`parallelize_experts_tp` leaves on an experts module: the mesh its slices split over."""


def expert_tp_placement(name: str) -> Any:
    """The placement over the tp mesh dim of an ``Fp8Experts`` tensor ``name`` (codes, grid or activation
    scale) under expert tensor parallelism (see the module doc)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if name.endswith("_activation_scale"):
        return Replicate()
    if name.startswith("gate_up_proj"):
        return _StridedShard(1, split_factor=2)
    if name.startswith("down_proj"):
        return Shard(2)
    raise KeyError(f"{name!r} is not a tensor of Fp8Experts")


def lora_refusal(where: str) -> str:
    return (
        f"{where}: PEFT LoRA target_parameters on the experts under expert tensor parallelism is not "
        "supported (each expert's LoRA delta is formed over the whole intermediate dim); split the experts "
        "by expert instead (parallelize_experts), whose adapters run on each rank's experts"
    )


def _name_in_error(module: nn.Module) -> str:
    return f"{type(module).__name__}({module.num_experts} experts, intermediate {_intermediate(module)})"


def _check(model: nn.Module, name: str, module: nn.Module, tp: int) -> None:
    if not isinstance(module, Fp8Experts) and fused_experts_shapes(module) is None:
        raise ExpertTensorParallelError(
            f"{name} ({type(module).__name__}): expert tensor parallelism splits fused experts whose forward "
            "Fp8Experts reproduces (gate and up concatenated, no bias); split these by expert "
            "(parallelize_experts) or with FSDP2"
        )
    wrapper = _stock_lora_wrapper(model, module)
    if wrapper is not None or _lora_wrappers(model, module):
        where = wrapper or next(n for n, m in model.named_modules() if m in _lora_wrappers(model, module))
        raise ExpertTensorParallelError(lora_refusal(where))
    if getattr(module, "_is_hooked", False) or getattr(module, EXPERT_TP_MESH, None) is not None:
        raise ExpertTensorParallelError(
            f"{name} is already split (parallelize_experts or _tp ran on it before)"
        )
    held = [leaf for leaf in EXPERT_PROJECTIONS if is_dtensor(module._parameters[leaf])]
    if held:
        raise ExpertTensorParallelError(
            f"{name}.{held[0]} is already a DTensor: apply parallelize_experts_tp to the model built on meta, "
            "before fully_shard or any other placement"
        )
    inter = _intermediate(module)
    rows, cols = module.block_size if isinstance(module, Fp8Experts) else (1, 1)
    for leaf, step, what in (("gate_up_proj", rows, "rows"), ("down_proj", cols, "columns")):
        if inter % tp or (inter // tp) % step:
            raise ExpertTensorParallelError(
                f"{name}.{leaf}: {tp} tensor-parallel ranks cannot split the intermediate size {inter} without "
                f"cutting a scale block ({(rows, cols)} blocks: each rank's {inter / tp:g} {what} must be "
                f"a multiple of {step}); choose a TP degree whose share is whole blocks, or split the experts "
                "by expert (parallelize_experts)"
            )


def _intermediate(module: nn.Module) -> int:
    """The experts' intermediate size (``down_proj [E, H, I]``: its last dim, whole, also once split)."""
    return int(module._parameters["down_proj"].shape[2])


def _distribute(tensor: torch.Tensor, mesh: Any, placement: Any) -> torch.Tensor:
    """``tensor`` (on meta) as a DTensor on ``mesh`` holding this rank's part (nothing allocated on meta)."""
    from torch.distributed.tensor import DTensor

    held = _held_indices(tuple(tensor.shape), tuple(mesh.shape), mesh.get_coordinate(), [placement])
    local = torch.empty(tuple(i.numel() for i in held), dtype=tensor.dtype, device=tensor.device)
    return DTensor.from_local(
        local, mesh, [placement], run_check=False, shape=tensor.shape, stride=tensor.stride()
    )


def parallelize_experts_tp(model: nn.Module, tp_mesh: Any) -> dict[str, str]:
    """Expert tensor parallelism on the 1-D ``tp_mesh`` for every FP8-resident experts module of
    ``expert_parallel_plan(model)`` (see the module doc). Call it on the model built on meta (beside
    ``parallelize_fp8`` on the same mesh), then ``to_empty`` and ``load_weights``: each rank reads only its
    slices of every expert's codes. Returns module name -> what each rank holds."""
    if tp_mesh.ndim != 1:
        raise ExpertTensorParallelError(
            f"the expert tensor-parallel mesh must be 1-D (one dim of your mesh: mesh['tp']), got {tp_mesh!r}"
        )
    modules = expert_parallel_plan(model)
    if not modules:
        raise ExpertTensorParallelError(
            f"{type(unwrap_peft(model)).__name__} has no fused experts module: nothing to split"
        )
    tp = tp_mesh.size()
    for name, module in modules.items():
        _check(model, name, module, tp)
    applied = {}
    for name, module in modules.items():
        for leaf in EXPERT_PROJECTIONS:
            held = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(
                _distribute(held.data, tp_mesh, expert_tp_placement(leaf)), requires_grad=held.requires_grad
            )
        for buffer in (
            (*Fp8Experts.SCALE_NAMES, *Fp8Experts.ACTIVATION_NAMES) if isinstance(module, Fp8Experts) else ()
        ):
            if module._buffers.get(buffer) is not None:
                module._buffers[buffer] = _distribute(
                    module._buffers[buffer], tp_mesh, expert_tp_placement(buffer)
                )
        setattr(module, EXPERT_TP_MESH, tp_mesh)
        module.forward = types.MethodType(_tp_forward, module)
        applied[name] = (
            f"{type(module).__name__}: intermediate {_intermediate(module) // tp} of "
            f"{_intermediate(module)} of all {module.num_experts} experts a rank"
        )
    return applied


class _CopyToTp(torch.autograd.Function):
    """Identity forward; backward sums the ranks' partial gradients (the input of a tensor-parallel region)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTp(torch.autograd.Function):
    """All-reduce (sum) forward of the ranks' partial outputs; identity backward (every rank's gradient of the
    replicated output is the same)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@contextlib.contextmanager
def _local(module: nn.Module) -> Iterator[None]:
    """The module's DTensor codes and grids as their local parts, its intermediate size this rank's share."""
    params = {leaf: module._parameters[leaf] for leaf in EXPERT_PROJECTIONS}
    buffers = {name: b for name, b in module._buffers.items() if b is not None and is_dtensor(b)}
    inter = getattr(module, "intermediate_dim", None)
    # the local parts (differentiable: a dequantized expert's gradient comes back as a DTensor of its slice)
    module._parameters.update({leaf: p.to_local() for leaf, p in params.items()})  # type: ignore[misc]
    module._buffers.update({name: b.to_local() for name, b in buffers.items()})  # type: ignore[misc]
    if inter is not None:
        module.intermediate_dim = inter // getattr(module, EXPERT_TP_MESH).size()
    try:
        yield
    finally:
        module._parameters.update(params)
        module._buffers.update(buffers)
        if inter is not None:
            module.intermediate_dim = inter


def _tp_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """This rank's partial output over its intermediate slice of every expert, summed over the tp group."""
    # PEFT applied after the split: its factors (or stock PEFT's parametrization) span the whole intermediate dim
    if parametrize.is_parametrized(self) or (isinstance(self, Fp8Experts) and active_deltas(self)):
        raise ExpertTensorParallelError(lora_refusal(_name_in_error(self)))
    group = getattr(self, EXPERT_TP_MESH).get_group()
    hidden_states = _CopyToTp.apply(hidden_states, group)
    if top_k_weights.requires_grad:
        top_k_weights = _CopyToTp.apply(top_k_weights, group)
    with _local(self):
        partial = type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    return _ReduceFromTp.apply(partial, group)
