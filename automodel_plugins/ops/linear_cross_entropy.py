"""Chunked ("cut") linear cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without ``[N, V]``.

The logits of a large-vocabulary head dominate training memory (``N * V * 4`` bytes, kept twice by autograd).
This op walks the non-ignored tokens in row chunks and, when a chunk's full-vocabulary logits would not fit the
memory budget with enough rows, the vocabulary in tiles. Per chunk it finds the fp32 log-sum-exp and target
logit, and - when gradients are wanted and the loss is a scalar - turns the chunk straight into its gradient
(``softmax - onehot``): ``dW`` accumulates in fp32, ``dinput`` rows are written. Backward then only rescales
those buffers by ``grad_output``. ``reduction="none"`` has a per-token ``grad_output`` that forward cannot
know: it saves the log-sum-exp and recomputes the chunks in backward.

Cost: with the whole vocabulary in one tile, three matmuls like the naive path. With vocabulary tiles a first
pass finds the log-sum-exp and a second recomputes each tile's logits (four matmuls), but with hundreds of rows
per matmul instead of a few dozen, and each weight tile reused from cache: on a CPU this beats streaming the
whole weight and weight gradient through memory for every small row chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import torch

__all__ = ["ChunkShape", "choose_chunk_size", "default_memory_budget", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_FP32_BYTES = 4
_ROW_ALIGN = 16
_TILE_ALIGN = 128
_MIN_BUDGET_BYTES = 4 << 20
_MAX_BUDGET_BYTES = 64 << 20
# The fp32 weight gradient (V * H * 4 bytes) is the op's unavoidable extra memory; the chunk working set is
# kept to this fraction of it so it adds little on top.
_WEIGHT_GRAD_FRACTION = 16
# Below this many rows, streaming the whole weight (twice) and weight gradient per chunk costs more than the
# extra matmul of vocabulary tiles; tiled chunks then take this many rows and tiles of at least _MIN_TILE.
_MIN_SINGLE_PASS_ROWS = 128
_TILED_ROWS = 1024
_MIN_TILE = 256


class ChunkShape(NamedTuple):
    """Rows (tokens) per chunk and vocabulary entries per tile; ``vocab == V`` means one pass, no tiles."""

    rows: int
    vocab: int


def _align_down(value: int, step: int) -> int:
    return value - value % step if value >= step else max(1, value)


def choose_chunk_size(
    n_tokens: int,
    vocab: int,
    budget_bytes: int,
    *,
    hidden: int = 0,
    logit_buffers: int = 1,
    weight_tile_copy: bool = False,
) -> ChunkShape:
    """Chunk rows and vocabulary tile whose fp32 working set fits ``budget_bytes``.

    The working set is ``logit_buffers`` ``[rows, tile]`` logit buffers, each row's input copy and input
    gradient (``2 * hidden`` floats per row), and with ``weight_tile_copy`` (a low-precision head) an fp32
    copy of the weight tile (``tile * hidden`` floats). If at least ``min(n_tokens, 128)`` rows of the whole
    vocabulary fit, one pass over the vocabulary; otherwise up to 1024 rows and the widest tile that fits
    (at least 256). Rows are rounded down to a multiple of 16, tiles to 128, when that large; never more rows
    than tokens.
    """
    if vocab <= 0 or budget_bytes <= 0 or hidden < 0 or logit_buffers < 1:
        raise ValueError(
            f"vocab and budget_bytes must be positive, got vocab={vocab}, budget={budget_bytes}, "
            f"hidden={hidden}, logit_buffers={logit_buffers}"
        )
    n_tokens = max(n_tokens, 1)
    floats = budget_bytes // _FP32_BYTES
    per_tile_col = hidden if weight_tile_copy else 0  # floats per vocabulary entry, independent of rows
    rows = (floats - per_tile_col * vocab) // (logit_buffers * vocab + 2 * hidden)
    if rows >= min(n_tokens, _MIN_SINGLE_PASS_ROWS):
        return ChunkShape(min(_align_down(rows, _ROW_ALIGN), n_tokens), vocab)
    rows = min(n_tokens, _TILED_ROWS)
    tile = (floats - 2 * hidden * rows) // (logit_buffers * rows + per_tile_col)
    if tile < _MIN_TILE:
        tile = min(_MIN_TILE, vocab)
        rows = max(1, (floats - per_tile_col * tile) // (logit_buffers * tile + 2 * hidden))
    tile = vocab if tile >= vocab else _align_down(tile, _TILE_ALIGN)
    return ChunkShape(min(_align_down(rows, _ROW_ALIGN), n_tokens), tile)


def default_memory_budget(vocab: int, hidden: int) -> int:
    """Default bytes for a chunk's working set: 1/16 of the fp32 weight gradient, within [4, 64] MiB."""
    weight_grad_bytes = vocab * hidden * _FP32_BYTES
    return min(_MAX_BUDGET_BYTES, max(_MIN_BUDGET_BYTES, weight_grad_bytes // _WEIGHT_GRAD_FRACTION))


# --- validation -------------------------------------------------------------------------------------------


def _check_tensors(
    input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise TypeError/ValueError naming the argument at fault, before any compute."""
    for name, t in (("input", input), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from input dtype {input.dtype}")
    if bias is not None and bias.dtype != input.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from input dtype {input.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension [..., H]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: input [..., {input.shape[-1]}] vs weight [{weight.shape[0]}, {weight.shape[1]}]"
        )
    n_tokens = input.shape[:-1].numel()
    if target.numel() != n_tokens:
        raise ValueError(
            f"token count mismatch: input {tuple(input.shape)} has {n_tokens} tokens, "
            f"target {tuple(target.shape)} has {target.numel()}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
    devices = {t.device for t in (input, weight, target, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_options(
    reduction: str,
    normalizer: float | torch.Tensor | None,
    softcap: float | None,
    chunk_size: int | tuple[int, int] | None,
    memory_budget_bytes: int | None,
) -> float | None:
    """Raise ValueError/TypeError for option values the op cannot honour; return the normalizer as a float."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError('normalizer divides a scalar loss; it cannot be used with reduction="none"')
        value = _normalizer_value(normalizer)
        if not (0 <= value < math.inf):
            raise ValueError(f"normalizer must be a non-negative finite count, got {value}")
    else:
        value = None
    if softcap is not None and not (isinstance(softcap, Real) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if chunk_size is not None:
        sizes = chunk_size if isinstance(chunk_size, tuple) else (chunk_size,)
        if not (1 <= len(sizes) <= 2 and all(_is_positive_int(v) for v in sizes)):
            raise ValueError(f"chunk_size must be a positive int or (rows, vocab_tile), got {chunk_size!r}")
    if memory_budget_bytes is not None and not _is_positive_int(memory_budget_bytes):
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    if chunk_size is not None and memory_budget_bytes is not None:
        raise ValueError("pass chunk_size or memory_budget_bytes, not both")
    return value


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _normalizer_value(normalizer: float | torch.Tensor) -> float:
    """The normalizer as a Python float (one host sync for a device tensor, as the label count needs anyway)."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer tensor must hold one value, got shape {tuple(normalizer.shape)}")
        return float(normalizer.detach().reshape(()).item())
    if isinstance(normalizer, Real) and not isinstance(normalizer, bool):
        return float(normalizer)
    raise TypeError(f"normalizer must be a number or a 0-d tensor, got {type(normalizer).__name__}")


def _valid_rows(target: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the non-ignored tokens and their targets; out-of-range targets raise like F.cross_entropy."""
    rows = (target != ignore_index).nonzero().squeeze(1)
    tgt = target.index_select(0, rows)
    if tgt.numel() and bool(((tgt < 0) | (tgt >= vocab)).any()):
        bad = tgt[(tgt < 0) | (tgt >= vocab)][0].item()
        raise ValueError(f"target {bad} is out of range for vocab size {vocab} (ignore_index={ignore_index})")
    return rows, tgt


# --- chunk kernels ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides tensors."""

    reduction: str
    normalizer: float | None
    softcap: float | None
    chunk: ChunkShape
    need_input_grad: bool
    need_weight_grad: bool
    need_bias_grad: bool
    loss_dtype: torch.dtype

    @property
    def any_grad(self) -> bool:
        return self.need_input_grad or self.need_weight_grad or self.need_bias_grad

    @property
    def precompute(self) -> bool:
        """Scalar losses with some gradient wanted compute the gradient in forward (grad_output is a scalar)."""
        return self.reduction != "none" and self.any_grad


@dataclass
class _Grads:
    """fp32 gradient buffers (None where not wanted); rows of ignored tokens stay zero."""

    input: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def allocate(cls, n_tokens: int, weight: torch.Tensor, plan: _Plan) -> _Grads:
        """Input grads start at zero (ignored rows stay so); weight and bias grads are left uninitialized
        because the first row chunk overwrites them (saves a pass over the ``[V, H]`` buffer)."""
        vocab, hidden = weight.shape
        kw = {"dtype": torch.float32, "device": weight.device}
        return cls(
            input=torch.zeros(n_tokens, hidden, **kw) if plan.need_input_grad else None,
            weight=torch.empty(vocab, hidden, **kw) if plan.need_weight_grad else None,
            bias=torch.empty(vocab, **kw) if plan.need_bias_grad else None,
        )

    def zero_if_no_rows(self, n_rows: int) -> None:
        """With no label rows no chunk ran, so the uninitialized weight and bias grads must become zeros."""
        if n_rows == 0:
            for g in (self.weight, self.bias):
                if g is not None:
                    g.zero_()


class _Head:
    """The head plus reusable chunk buffers; computes fp32 logit tiles and adds their gradients."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> None:
        self.weight = weight
        self._w32_tile: tuple[int, torch.Tensor] | None = None
        self.b32 = None if bias is None else bias.float()
        self.vocab, hidden = weight.shape
        self.softcap = plan.softcap
        self.rows, self.tile = plan.chunk
        kw = {"dtype": torch.float32, "device": weight.device}
        self.tile_buf = torch.empty(self.rows * self.tile, **kw)
        self.cap_buf = torch.empty(self.rows * self.tile, **kw) if plan.softcap is not None else None
        self.dx_chunk = torch.empty(self.rows, hidden, **kw) if plan.need_input_grad else None

    def w32(self, v0: int, v1: int) -> torch.Tensor:
        """Rows ``[v0, v1)`` of the weight in fp32: a view, or for low precision a per-tile copy (cached for
        the tile's next use), so a bf16 head is never copied to fp32 whole."""
        if self.weight.dtype == torch.float32:
            return self.weight[v0:v1]
        if self._w32_tile is None or self._w32_tile[0] != v0:
            self._w32_tile = None  # free the previous tile's copy first
            self._w32_tile = (v0, self.weight[v0:v1].float())
        return self._w32_tile[1]

    def logits(self, x32: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """(Soft-capped) fp32 logits of vocabulary ``[v0, v1)``; with softcap keeps d(capped)/d(raw) too."""
        rows = x32.shape[0]
        out = self.tile_buf[: rows * (v1 - v0)].view(rows, v1 - v0)
        w = self.w32(v0, v1)
        if self.b32 is None:
            torch.mm(x32, w.T, out=out)
        else:
            torch.addmm(self.b32[v0:v1], x32, w.T, out=out)
        if self.softcap is not None:
            cap = self.cap_buf[: out.numel()].view_as(out)
            torch.tanh(out.div_(self.softcap), out=cap)
            torch.mul(cap, self.softcap, out=out)
            cap.square_().neg_().add_(1.0)  # d/dy [c * tanh(y / c)] = 1 - tanh^2
        return out

    def add_tile_grad(
        self,
        probs: torch.Tensor,
        local_target: torch.Tensor,
        in_tile: torch.Tensor,
        row_scale: torch.Tensor | None,
        x32: torch.Tensor,
        v0: int,
        v1: int,
        dx: torch.Tensor | None,
        grads: _Grads,
        overwrite: bool,
    ) -> None:
        """``probs`` (softmax over the tile) becomes the logits' gradient in place, then feeds the three grads.

        ``overwrite`` (the first row chunk) writes the weight and bias grads instead of adding to them.
        """
        probs.scatter_add_(1, local_target.unsqueeze(1), in_tile.to(probs.dtype).neg_().unsqueeze(1))
        if self.softcap is not None:
            probs.mul_(self.cap_buf[: probs.numel()].view_as(probs))
        if row_scale is not None:
            probs.mul_(row_scale.unsqueeze(1))
        if dx is not None:
            dx.addmm_(probs, self.w32(v0, v1))
        if grads.weight is not None:
            grads.weight[v0:v1].addmm_(probs.T, x32, beta=0.0 if overwrite else 1.0)
        if grads.bias is not None:
            if overwrite:
                torch.sum(probs, dim=0, out=grads.bias[v0:v1])
            else:
                grads.bias[v0:v1].add_(probs.sum(dim=0))


def _target_in_tile(target: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each row's target inside the tile (clamped, so always a valid index) and whether it is there."""
    return (target - v0).clamp_(0, v1 - v0 - 1), (target >= v0) & (target < v1)


class _ChunkPass:
    """One row chunk: its rows, targets and fp32 inputs, and the passes over its vocabulary tiles."""

    def __init__(self, head: _Head, x2d: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> None:
        self.head, self.rows, self.target = head, rows, target
        self.x32 = x2d.index_select(0, rows).to(torch.float32)  # small copy; the head's matmuls run in fp32
        self.tiles = [(v0, min(v0 + head.tile, head.vocab)) for v0 in range(0, head.vocab, head.tile)]

    def log_sum_exp(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(lse, target logit, probs): an online log-sum-exp over the tiles; with a single tile its softmax
        is left in the buffer and returned, so the gradient needs no second matmul."""
        n = self.rows.numel()
        shift = torch.full((n,), -math.inf, dtype=torch.float32, device=self.x32.device)
        sumexp = torch.zeros_like(shift)
        target_logit = torch.zeros_like(shift)
        for v0, v1 in self.tiles:
            logits = self.head.logits(self.x32, v0, v1)
            col, here = _target_in_tile(self.target, v0, v1)
            target_logit = torch.where(here, logits.gather(1, col.unsqueeze(1)).squeeze(1), target_logit)
            new_shift = torch.maximum(shift, logits.amax(dim=1))
            sumexp.mul_((shift - new_shift).exp_()).add_(
                logits.sub_(new_shift.unsqueeze(1)).exp_().sum(dim=1)
            )
            shift = new_shift
        lse = shift.add_(sumexp.log())
        probs = logits.div_(sumexp.unsqueeze(1)) if len(self.tiles) == 1 else None
        return lse, target_logit, probs

    def add_grads(
        self,
        lse: torch.Tensor,
        row_scale: torch.Tensor | None,
        grads: _Grads,
        overwrite: bool,
        probs: torch.Tensor | None = None,
    ) -> None:
        """Accumulate this chunk's gradient contributions, recomputing tile softmaxes from ``lse`` as needed."""
        dx = None
        if grads.input is not None:
            dx = self.head.dx_chunk[: self.rows.numel()].zero_()
        for v0, v1 in self.tiles:
            if probs is None or len(self.tiles) > 1:
                probs = self.head.logits(self.x32, v0, v1).sub_(lse.unsqueeze(1)).exp_()
            col, here = _target_in_tile(self.target, v0, v1)
            self.head.add_tile_grad(probs, col, here, row_scale, self.x32, v0, v1, dx, grads, overwrite)
        if dx is not None:
            grads.input.index_copy_(0, self.rows, dx)


def _chunks(n_rows: int, rows_per_chunk: int):
    """(start, stop) pairs covering ``range(n_rows)``."""
    for start in range(0, n_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, n_rows)


def _forward_chunks(
    x2d: torch.Tensor, head: _Head, rows: torch.Tensor, tgt: torch.Tensor, grads: _Grads | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-valid-row loss and log-sum-exp (fp32); with ``grads``, accumulate the unscaled gradients too."""
    losses = torch.empty(rows.numel(), dtype=torch.float32, device=x2d.device)
    lse = torch.empty_like(losses)
    for start, stop in _chunks(rows.numel(), head.rows):
        chunk = _ChunkPass(head, x2d, rows[start:stop], tgt[start:stop])
        chunk_lse, target_logit, probs = chunk.log_sum_exp()
        lse[start:stop] = chunk_lse
        torch.sub(chunk_lse, target_logit, out=losses[start:stop])
        if grads is not None:
            chunk.add_grads(chunk_lse, None, grads, overwrite=start == 0, probs=probs)
    if grads is not None:
        grads.zero_if_no_rows(rows.numel())
    return losses, lse


def _backward_chunks(
    x2d: torch.Tensor,
    head: _Head,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    grads: _Grads,
) -> None:
    """Recompute each chunk's softmax from the saved log-sum-exp and accumulate ``row_scale``-weighted grads."""
    for start, stop in _chunks(rows.numel(), head.rows):
        chunk = _ChunkPass(head, x2d, rows[start:stop], tgt[start:stop])
        chunk.add_grads(lse[start:stop], row_scale[start:stop], grads, overwrite=start == 0)
    grads.zero_if_no_rows(rows.numel())


# --- autograd ---------------------------------------------------------------------------------------------


def _denominator(plan: _Plan, n_valid: int, device: torch.device) -> torch.Tensor:
    """What the summed loss is divided by: the normalizer, the label count for "mean", or 1.

    With no label tokens the sum is 0 and so is the result (a 0 normalizer is accepted only then).
    """
    if plan.normalizer is not None:
        if plan.normalizer == 0 and n_valid:
            raise ValueError(f"normalizer is 0 but the batch has {n_valid} label tokens")
        value = plan.normalizer or 1.0
    else:
        value = float(max(n_valid, 1)) if plan.reduction == "mean" else 1.0
    return torch.tensor(value, dtype=torch.float32, device=device)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked loss; scalar reductions precompute gradients in forward, "none" recomputes in backward."""

    @staticmethod
    def forward(
        ctx,
        x2d: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        plan: _Plan,
    ) -> torch.Tensor:
        rows, tgt = _valid_rows(target, ignore_index, weight.shape[0])
        denom = _denominator(plan, rows.numel(), x2d.device)  # validates a 0 normalizer before any compute
        grads = _Grads.allocate(x2d.shape[0], weight, plan) if plan.precompute else None
        losses, lse = _forward_chunks(x2d, _Head(weight, bias, plan), rows, tgt, grads)
        if plan.reduction == "none":
            out = torch.zeros(target.shape[0], dtype=torch.float32, device=x2d.device)
            out.index_copy_(0, rows, losses)
        else:
            out = losses.sum() / denom
        ctx.plan, ctx.grads, ctx.denom = plan, grads, denom
        ctx.save_for_backward(x2d, weight, bias, rows, tgt, lse)
        return out.to(plan.loss_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x2d, weight, bias, rows, tgt, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None  # consumed: a retained-graph second backward recomputes
            scale = grad_out.to(torch.float32) / ctx.denom
            for g in (grads.input, grads.weight, grads.bias):
                if g is not None:
                    g.mul_(scale)
        else:
            grads = _Grads.allocate(x2d.shape[0], weight, plan)
            if plan.reduction == "none":
                row_scale = grad_out.reshape(-1).index_select(0, rows).to(torch.float32)
            else:
                row_scale = (grad_out.to(torch.float32) / ctx.denom).expand(rows.numel())
            _backward_chunks(x2d, _Head(weight, bias, plan), rows, tgt, lse, row_scale, grads)
        return (
            None if grads.input is None else grads.input.to(x2d.dtype),
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget_bytes: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(input @ weight.T + bias, target)`` computed in row chunks, never holding ``[N, V]``.

    Args mirror ``torch.nn.functional.linear_cross_entropy(input, weight, target)`` so the two swap:
    ``input [..., H]``, ``weight [V, H]``, ``target [...]`` (integer, same token count), ``bias [V]``.
    ``reduction``: ``"mean"`` over non-ignored tokens (0, with zero gradients, when every token is ignored),
    ``"sum"``, or ``"none"`` (per-token loss shaped like ``target``, 0 where ignored). ``normalizer``: with
    ``"mean"`` or ``"sum"``, return ``sum / normalizer`` instead (e.g. the label-token count of a whole
    gradient-accumulation batch). ``softcap``: logits become ``softcap * tanh(logits / softcap)``.
    ``chunk_size`` (rows per chunk, or ``(rows, vocab_tile)``) or ``memory_budget_bytes`` (bytes of a chunk's
    fp32 working set, see :func:`choose_chunk_size`) override the default, :func:`default_memory_budget`.
    Logits, log-sum-exp and gradient accumulation run in fp32; the gradients come back in the inputs' dtypes
    and so does the loss, unless ``loss_dtype`` asks for another floating dtype (``torch.float32`` keeps a
    bf16 model's loss unrounded, as transformers reports it).
    """
    _check_tensors(input, weight, target, bias)
    normalizer_value = _check_options(reduction, normalizer, softcap, chunk_size, memory_budget_bytes)
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be a floating-point torch.dtype, got {loss_dtype!r}")
    vocab, hidden = weight.shape
    x2d = input.reshape(-1, hidden)
    target1d = target.reshape(-1).long()
    grad_on = torch.is_grad_enabled()
    n_tokens = max(x2d.shape[0], 1)
    if chunk_size is None:
        budget = memory_budget_bytes or default_memory_budget(vocab, hidden)
        buffers = 2 if softcap is not None else 1  # softcap keeps its derivative in a second tile buffer
        chunk = choose_chunk_size(
            n_tokens,
            vocab,
            budget,
            hidden=hidden,
            logit_buffers=buffers,
            weight_tile_copy=weight.dtype != torch.float32,
        )
    else:
        rows, tile = chunk_size if isinstance(chunk_size, tuple) else (chunk_size, vocab)
        chunk = ChunkShape(min(rows, n_tokens), min(tile, vocab))
    plan = _Plan(
        reduction=reduction,
        normalizer=normalizer_value,
        softcap=None if softcap is None else float(softcap),
        chunk=chunk,
        need_input_grad=grad_on and input.requires_grad,
        need_weight_grad=grad_on and weight.requires_grad,
        need_bias_grad=grad_on and bias is not None and bias.requires_grad,
        loss_dtype=loss_dtype or input.dtype,
    )
    out = _LinearCrossEntropy.apply(x2d, weight, bias, target1d, int(ignore_index), plan)
    return out.reshape(target.shape) if reduction == "none" else out
