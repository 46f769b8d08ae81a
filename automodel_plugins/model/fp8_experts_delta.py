"""LoRA deltas on FP8-resident fused experts: each hit expert's matrix is its dequantized codes plus
``scaling * lhs[e] @ rhs[e]``, formed for one run of hit experts at a time and never kept.

PEFT's ``ParamWrapper`` (``LoraConfig(target_parameters=[...])``) adapts a fused expert tensor ``W [E, R, C]`` by
parametrizing it as ``torch.baddbmm(W, lhs, rhs, alpha=scaling)`` (its ``_LoraFactorsProxy``: ``lhs [E, R, r]`` from
``lora_B``, ``rhs [E, r, C]`` from ``lora_A``, in the weight's dtype) for the length of the forward; autograd then
keeps the whole ``[E, R, C]`` sum for the backward. On :class:`~automodel_plugins.model.fp8_experts.Fp8Experts`
the same factors arrive as :class:`ExpertDelta` (:mod:`~automodel_plugins.model.fp8_experts_lora` attaches them
while the wrapper's forward runs), and :class:`_LoraExpertsLinear` computes, for each run of hit experts within
``Fp8Experts.dequant_budget_bytes``: the dequantized matrices (the grouped path's reused buffer), the same
``baddbmm`` added in place on just those experts, then the grouped matmul (or, for the eager loop, one
``torch.mm`` per expert, as ``F.linear`` does). Its graph saves the projection's input (as stock's does), the
codes, the scales, the routing (Python ints) and the factors; the backward forms each run's matrices again for the
input gradient, then reuses the same buffer for the weight gradient ``g_e^T x_e`` of those experts and takes the
factors' gradients from it as ``baddbmm``'s backward does (``alpha * gW @ rhs^T``, ``alpha * lhs^T @ gW``). So
the step holds at most one run of dequantized experts at a time, against stock's summed ``[E, R, C]`` weight per
adapted tensor (kept from forward to backward) and its ``[E, R, C]`` weight gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.model.fp8_grouped import (
    ExpertGroups,
    _dequantize_experts,
    _grouped_mm,
    experts_per_run,
    per_group_mm,
)
from automodel_plugins.model.fp8_resident import DequantLayout

if TYPE_CHECKING:
    from automodel_plugins.model.fp8_experts import Fp8Experts

__all__ = ["ExpertDelta", "active_deltas", "attached_deltas", "fp8_lora_experts_linear"]

_ATTACHED = "_expert_deltas"


@dataclass(frozen=True)
class ExpertDelta:
    """One adapter's delta on a fused expert tensor ``[E, R, C]``: ``scaling * lhs[e] @ rhs[e]`` for expert
    ``e`` (PEFT's ``ParamWrapper.get_delta_factors``), the factors in the experts' compute dtype."""

    lhs: torch.Tensor
    """``[E, R, r]``"""
    rhs: torch.Tensor
    """``[E, r, C]``"""
    scaling: float


@contextmanager
def attached_deltas(experts: Fp8Experts, name: str, deltas: Sequence[ExpertDelta]) -> Iterator[None]:
    """While the block runs, ``experts``' forward adds ``deltas`` to its ``name`` tensor (``gate_up_proj`` or
    ``down_proj``); nested wrappers (one per adapted tensor) each attach their own."""
    attached: dict[str, tuple[ExpertDelta, ...]] = experts.__dict__.setdefault(_ATTACHED, {})
    before = attached.get(name)
    attached[name] = (*(before or ()), *deltas)
    try:
        yield
    finally:
        if before is None:
            attached.pop(name, None)
        else:
            attached[name] = before


def active_deltas(experts: Fp8Experts) -> Mapping[str, tuple[ExpertDelta, ...]]:
    """The deltas attached to ``experts`` now, by tensor name (empty: no adapter is active)."""
    return experts.__dict__.get(_ATTACHED) or {}


def _merged_run(
    codes: torch.Tensor,
    scale: torch.Tensor,
    experts: tuple[int, ...],
    layout: DequantLayout,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scalings: Sequence[float],
) -> torch.Tensor:
    """``[n, R, C]`` (the reused buffer): the listed experts' dequantized matrices plus every delta."""
    weights = _dequantize_experts(codes, scale, experts, layout)
    index = torch.tensor(experts, device=codes.device)
    # as PEFT's proxy: the sum in the weight's dtype, whatever autocast is on
    with torch.autocast(device_type=codes.device.type, enabled=False):
        for (lhs, rhs), scaling in zip(factors, scalings, strict=True):
            weights.baddbmm_(lhs.index_select(0, index), rhs.index_select(0, index), alpha=scaling)
    return weights


def _matmul(a: torch.Tensor, b: torch.Tensor, counts: tuple[int, ...], grouped: bool) -> torch.Tensor:
    """``a``'s row groups each times its matrix of ``b``: the grouped kernel, or ``torch.mm`` per group."""
    return _grouped_mm(a, b, counts) if grouped else per_group_mm(a, b, counts)


class _LoraExpertsLinear(torch.autograd.Function):
    """Rows of ``x`` sorted by expert, each times ``(dequantized W[e] + deltas[e]).T``; saves the input, the
    codes, the scales, the routing and the factors, never a formed matrix."""

    @staticmethod
    def forward(ctx: Any, x, codes, scale, groups, layout, budget, grouped, scalings, *factors):  # type: ignore[override]
        pairs = list(zip(factors[::2], factors[1::2], strict=True))
        ctx.save_for_backward(x, codes, scale, *factors)
        ctx.groups, ctx.layout, ctx.budget = groups, layout, budget
        ctx.grouped, ctx.scalings = grouped, scalings
        out = x.new_zeros(groups.rows, codes.shape[1])  # rows past the groups (sentinel ids) stay zero
        for g0, g1, r0, r1 in groups.runs(experts_per_run(codes, layout, budget)):
            weights = _merged_run(codes, scale, groups.experts[g0:g1], layout, pairs, scalings)
            out[r0:r1] = _matmul(x[r0:r1], weights.transpose(-2, -1), groups.counts[g0:g1], grouped)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        x, codes, scale, *factors = ctx.saved_tensors
        pairs = list(zip(factors[::2], factors[1::2], strict=True))
        groups, layout, scalings = ctx.groups, ctx.layout, ctx.scalings
        needs_x = ctx.needs_input_grad[0]
        needs_factors = any(ctx.needs_input_grad[8:])
        grad = grad_out.to(layout.compute_dtype).contiguous()
        grad_x = torch.zeros_like(x) if needs_x else None
        grad_factors = [torch.zeros_like(f) if needs_factors else None for f in factors]
        for g0, g1, r0, r1 in groups.runs(experts_per_run(codes, layout, ctx.budget)):
            experts = groups.experts[g0:g1]
            weights = _merged_run(codes, scale, experts, layout, pairs, scalings)
            if needs_x:
                grad_x[r0:r1] = _matmul(grad[r0:r1], weights, groups.counts[g0:g1], ctx.grouped)
            if not needs_factors:
                continue
            grad_weights = weights  # the buffer again: [n, R, C] gradients of the formed matrices
            row = r0
            for i, count in enumerate(groups.counts[g0:g1]):
                torch.mm(grad[row : row + count].t(), x[row : row + count], out=grad_weights[i])
                row += count
            index = torch.tensor(experts, device=codes.device)
            for j, ((lhs, rhs), scaling) in enumerate(zip(pairs, scalings, strict=True)):
                rhs_run, lhs_run = rhs.index_select(0, index), lhs.index_select(0, index)
                grad_factors[2 * j][index] = grad_weights.bmm(rhs_run.transpose(1, 2)) * scaling
                grad_factors[2 * j + 1][index] = lhs_run.transpose(1, 2).bmm(grad_weights) * scaling
        return grad_x, None, None, None, None, None, None, None, *grad_factors


def fp8_lora_experts_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    groups: ExpertGroups,
    layout: DequantLayout,
    budget_bytes: int,
    deltas: Sequence[ExpertDelta],
    *,
    grouped: bool = True,
) -> torch.Tensor:
    """``[S, R]``: the rows of ``x [S, C]`` (sorted by expert, ``groups``) each times ``(W[e] + delta[e]).T``,
    ``W`` the dequantized ``uint8`` ``codes [E, R, C]``; ``grouped=False`` multiplies expert by expert with
    ``torch.mm`` (the eager loop's ``F.linear``). ``x`` is cast to the compute dtype first."""
    x = x.to(layout.compute_dtype)
    factors = [t.to(layout.compute_dtype) for delta in deltas for t in (delta.lhs, delta.rhs)]
    scalings = tuple(float(delta.scaling) for delta in deltas)
    return _LoraExpertsLinear.apply(
        x, codes, scale, groups, layout, budget_bytes, grouped, scalings, *factors
    )
