"""The grouped forward of :class:`~automodel_plugins.model.fp8_experts.Fp8Experts`: transformers'
``grouped_mm_experts_forward`` (``integrations/moe.py``) step for step, with each fused expert matrix taken from
its FP8 codes.

Tokens are sorted by expert as stock sorts them; then, per projection, only the experts the batch hits are
dequantized (:func:`dequantize_block_matrix`: the values the loader's own dequantization gives, bit for bit, so
exactly what a dequantize-at-load model holds) into a reused buffer, and one grouped matmul runs over them
(``torch.nn.functional.grouped_mm``, else ``torch._grouped_mm``; a loop of ``torch.mm`` where neither applies).
The autograd graph keeps the FP8 codes, their scales and the routing (hit experts and their token counts, as
Python ints), never a dequantized matrix: the backward dequantizes the hit experts again for the input gradient.

Why a reused buffer: a fresh allocation of a layer's hit experts (tens to hundreds of MiB) is page-faulted in on
every call on CPU, which costs about as much as the dequantization itself. The buffer belongs to the thread (the
CUDA autograd engine runs the backward on its own thread, so forward and backward never share one) and to the
device and dtype; it is only ever read inside the call that filled it, so reusing it across layers and steps is
safe; CUDA graphs and ``torch.compile`` of this path are not supported. Its size is bounded by
``Fp8Experts.dequant_budget_bytes``: hit experts beyond the budget are processed a run at a time.
:func:`release_dequant_buffers` frees it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from automodel_plugins.model.fp8_resident import DequantLayout

if TYPE_CHECKING:
    from automodel_plugins.model.fp8_experts import Fp8Experts

__all__ = [
    "ExpertGroups",
    "dequantize_block_matrix",
    "fp8_grouped_linear",
    "grouped_experts_forward",
    "release_dequant_buffers",
]

GroupedLinear = Callable[[torch.Tensor, str, "ExpertGroups"], torch.Tensor]
"""``(rows sorted by expert, fused tensor name, their groups) -> the projection``."""

_ALIGNMENT = 16
"""Bytes: the CPU ``grouped_mm`` kernel refuses strides (and, before torch 2.11, pointers) not a multiple of it."""


@dataclass(frozen=True)
class ExpertGroups:
    """The routing of rows sorted by expert: ``experts[i]`` takes the next ``counts[i]`` rows (hit experts only,
    ascending); rows past ``sum(counts)`` (ids outside ``0..E-1``: the eager loop's skipped sentinel) get zeros."""

    experts: tuple[int, ...]
    counts: tuple[int, ...]
    rows: int

    @classmethod
    def of(cls, sorted_ids: torch.Tensor, num_experts: int) -> ExpertGroups:
        """The groups of ``sorted_ids`` (expert ids, ascending): one host sync, like stock's eager loop."""
        ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        pairs = [(e, c) for e, c in zip(ids.tolist(), counts.tolist(), strict=True) if 0 <= e < num_experts]
        return cls(tuple(e for e, _ in pairs), tuple(c for _, c in pairs), int(sorted_ids.numel()))

    def runs(self, per_run: int) -> list[tuple[int, int, int, int]]:
        """``(first group, end group, first row, end row)`` of runs of at most ``per_run`` experts."""
        out, row = [], 0
        for g0 in range(0, len(self.experts), per_run):
            g1 = min(len(self.experts), g0 + per_run)
            rows = sum(self.counts[g0:g1])
            out.append((g0, g1, row, row + rows))
            row += rows
        return out


class _Buffers(threading.local):
    """Per thread: one flat buffer per (device, dtype), grown to the largest run of hit experts seen."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        key = (device, dtype)
        flat = self.by_key.get(key)
        if flat is None or flat.numel() < numel:
            self.by_key.pop(key, None)  # drop the old one before allocating the larger one
            flat = self.by_key[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


_BUFFERS = _Buffers()


def release_dequant_buffers() -> None:
    """Free this thread's dequantization buffers (they are reallocated on the next grouped forward)."""
    _BUFFERS.by_key.clear()


def _dequantize_experts(
    codes: torch.Tensor, scale: torch.Tensor, experts: tuple[int, ...], layout: DequantLayout
) -> torch.Tensor:
    """``[len(experts), R, C]``: the listed experts' matrices in the compute dtype, in the reused buffer."""
    _, rows, cols = codes.shape
    out = _BUFFERS.take((len(experts), rows, cols), layout.compute_dtype, codes.device)
    for i, expert in enumerate(experts):
        dequantize_block_matrix(codes[expert], scale[expert], layout, out[i])
    return out


def dequantize_block_matrix(
    codes: torch.Tensor, grid: torch.Tensor, layout: DequantLayout, out: torch.Tensor
) -> torch.Tensor:
    """Write ``(codes.float() * its block's scale).to(dtype)`` into ``out`` (contiguous ``[R, C]``): bit for bit
    what :func:`~automodel_plugins.fp8.decode.dequantize` gives, by table: per block row, each column block's
    256 possible values computed by that very formula, then one ``index_select`` of ``code + 256 * column
    block`` (plain torch ops, so any device; on CPU about twice as fast as the loader's numpy tables).

    No NaN/inf check: the codes of a resident module were checked when they were loaded (``check_finite``);
    a non-finite code gives what the formula gives, as in a dequantized model."""
    rows, cols = codes.shape
    bm, bn = layout.block_size
    device = codes.device
    values = torch.arange(256, dtype=torch.uint8, device=device).view(layout.fp8_dtype).float()
    tables = (values * grid.float()[..., None]).to(layout.compute_dtype)  # [R/bm, C/bn, 256]
    offsets = torch.arange(cols, device=device, dtype=torch.int32).div_(bn, rounding_mode="floor").mul_(256)
    index = _BUFFERS.take((min(bm, rows), cols), torch.int32, device)
    flat = out.view(-1)
    for block_row, r0 in enumerate(range(0, rows, bm)):
        r1 = min(rows, r0 + bm)
        part = index[: r1 - r0]
        torch.add(codes[r0:r1], offsets, out=part)
        torch.index_select(tables[block_row].view(-1), 0, part.view(-1), out=flat[r0 * cols : r1 * cols])
    return out


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes ``a [S, K]`` and ``b [n, K, N]`` as they are: CPU in fp32 or BF16,
    CUDA (SM80+) in BF16, and every stride and pointer a multiple of 16 bytes."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (8, 0):
            return False
    elif a.device.type != "cpu" or a.dtype not in (torch.float32, torch.bfloat16):
        return False
    for tensor in (a, b):
        if tensor.data_ptr() % _ALIGNMENT:
            return False
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
            if size > 1 and stride != 1 and (stride * tensor.element_size()) % _ALIGNMENT:
                return False
    return True


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``a``'s consecutive row groups (``counts``) each times its matrix of ``b``: ``[S, N]``."""
    if _grouped_mm_fits(a, b):
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(a.device)
        grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return grouped(a, b, offs=offsets)
    return per_group_mm(a, b, counts)


def per_group_mm(a: torch.Tensor, b: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """The same product one ``torch.mm`` per group (the eager order of sums; strides the kernel refuses)."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    row = 0
    for i, count in enumerate(counts):
        torch.mm(a[row : row + count], b[i], out=out[row : row + count])
        row += count
    return out


def experts_per_run(codes: torch.Tensor, layout: DequantLayout, budget_bytes: int) -> int:
    """How many experts' dequantized ``[R, C]`` matrices fit ``budget_bytes`` at once (at least one)."""
    _, rows, cols = codes.shape
    return max(1, budget_bytes // max(1, rows * cols * layout.compute_dtype.itemsize))


def _fp8_grouped_apply(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    groups: ExpertGroups,
    layout: DequantLayout,
    budget_bytes: int,
    *,
    transposed: bool,
) -> torch.Tensor:
    """Each group's rows of ``x`` times its expert's dequantized matrix ``W [R, C]``: ``x @ W.T`` (forward,
    ``transposed``) or ``x @ W`` (the input gradient), a run of experts within ``budget_bytes`` at a time."""
    _, rows, cols = codes.shape
    width = rows if transposed else cols
    if not groups.experts:
        return x.new_zeros(groups.rows, width)
    runs = groups.runs(experts_per_run(codes, layout, budget_bytes))
    out = None
    for g0, g1, r0, r1 in runs:
        weights = _dequantize_experts(codes, scale, groups.experts[g0:g1], layout)
        matrices = weights.transpose(-2, -1) if transposed else weights
        if len(runs) == 1 and r1 == groups.rows:
            return _grouped_mm(x, matrices, groups.counts)
        out = x.new_zeros(groups.rows, width) if out is None else out
        out[r0:r1] = _grouped_mm(x[r0:r1], matrices, groups.counts[g0:g1])
    return out


class _Fp8GroupedLinear(torch.autograd.Function):
    """The grouped ``F.linear`` over FP8 expert matrices whose graph keeps the codes and the routing only."""

    @staticmethod
    def forward(ctx: Any, x, codes, scale, groups: ExpertGroups, layout: DequantLayout, budget: int):  # type: ignore[override]
        ctx.save_for_backward(codes, scale)
        ctx.groups, ctx.layout, ctx.budget, ctx.x_dtype = groups, layout, budget, x.dtype
        return _fp8_grouped_apply(x, codes, scale, groups, layout, budget, transposed=True)

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad = grad_out.to(ctx.layout.compute_dtype).contiguous()
            grad_x = _fp8_grouped_apply(
                grad, codes, scale, ctx.groups, ctx.layout, ctx.budget, transposed=False
            ).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


def fp8_grouped_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    groups: ExpertGroups,
    layout: DequantLayout,
    budget_bytes: int,
) -> torch.Tensor:
    """``[S, R]``: the rows of ``x [S, C]`` (sorted by expert, ``groups``) each times ``W[e].T``, ``W`` the
    dequantized ``uint8`` ``codes [E, R, C]`` with block ``scale`` grids; ``x`` is cast to the compute dtype
    first (as stock casts the input to the weight's dtype)."""
    x = x.to(layout.compute_dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Fp8GroupedLinear.apply(x, codes, scale, groups, layout, budget_bytes)
    return _fp8_grouped_apply(x, codes, scale, groups, layout, budget_bytes, transposed=True)


def grouped_experts_forward(
    module: Fp8Experts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    linear: GroupedLinear | None = None,
) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` over FP8 codes: the same sort, gathers, gate, routing
    weights, un-sort and per-token sum over the top-k, so the result is the dequantized model's grouped path.
    ``linear(x, name, groups)``: the projection by the fused tensor ``name`` (default: :func:`fp8_grouped_linear`
    over the codes; LoRA on the experts passes its own, :mod:`~automodel_plugins.model.fp8_experts_delta`)."""
    layout, budget = module._layout(), module.dequant_budget_bytes

    def project(x: torch.Tensor, name: str) -> torch.Tensor:
        if linear is not None:
            return linear(x, name, groups)
        return fp8_grouped_linear(x, getattr(module, name), module.scale(name), groups, layout, budget)

    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    groups = ExpertGroups.of(expert_ids_g, module.num_experts)
    proj_out = project(selected_hidden_states_g, "gate_up_proj")
    gate, up = proj_out.chunk(2, dim=-1)
    proj_out = module.act_fn(gate) * up
    proj_out = project(proj_out, "down_proj")
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=hidden_states.device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)
