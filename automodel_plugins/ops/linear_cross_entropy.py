"""Fused linear cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without ``[N, V]`` logits.

The logits of a large-vocabulary head dominate training memory (``N * V * 4`` bytes, kept twice by autograd).
Two paths, picked outside the op from grad mode, ``requires_grad`` and the reduction:

* A scalar loss (``"mean"``/``"sum"``) that needs gradients: its upstream gradient is one number, so the
  gradients are formed in the forward (Liger's order), in chunks of token rows over the whole vocabulary:
  ``logits = x_c W^T`` in the head's dtype, log-sum-exp and softmax in fp32 in place, ``G = softmax - onehot``
  (scaled by the denominator, times the softcap's derivative) rounded once to the head's dtype, then
  ``dx_c = G W`` and ``dW += G^T x_c`` (``addmm`` into the weight's dtype: no fp32 ``[V, H]`` buffer). Three
  matmuls, as stock, and about ten large ops per chunk; the backward only scales the saved gradients by the
  upstream scalar. One chunk is stock's arithmetic; each further chunk adds one rounding to the bf16 ``dW``.
* Otherwise (``reduction="none"``: a per-token upstream gradient; no gradient wanted; vocabulary tiles asked
  for, or a vocabulary too wide for the chunk budget), as Cut Cross-Entropy: walk ``[rows, vocabulary tile]``
  blocks of the label tokens keeping only each token's log-sum-exp; the backward recomputes each block's
  logits and writes each weight-gradient tile ``G^T x`` once in the weight's dtype. Four matmuls.

Matmuls run in the head's dtype (bf16 matmuls accumulate in fp32 and round once, like stock's ``x @ W.T``);
log-sum-exp, softmax and every sum across blocks in fp32 (fp64 for an fp64 head). Under ``torch.compile`` each
path is a ``torch.library`` custom op (host syncs inside, fake kernels for shapes, registered autograd), so a
compiled caller has no graph break; eager calls run the same functions through an ``autograd.Function``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import torch

__all__ = [
    "ChunkShape",
    "choose_chunk_size",
    "default_memory_budget",
    "grad_chunk_rows",
    "linear_cross_entropy",
    "low_precision_chunk_size",
]

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
# A low-precision head's block: bf16 logits + their fp32 copy per entry; tiles at least this wide (narrower
# matmuls lose speed and the fp32 input-gradient sum is read and written once per tile).
_LOW_PRECISION_ENTRY_BYTES = 6
_MIN_LOW_PRECISION_TILE = 1024


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
        if value is not None and not (0 <= value < math.inf):
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


def _normalizer_value(normalizer: float | torch.Tensor) -> float | None:
    """A number normalizer as a float; a tensor is checked for shape only (its value is read inside the op,
    so a compiled caller has no host sync here) and gives ``None``."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer tensor must hold one value, got shape {tuple(normalizer.shape)}")
        return None
    if isinstance(normalizer, Real) and not isinstance(normalizer, bool):
        return float(normalizer)
    raise TypeError(f"normalizer must be a number or a 0-d tensor, got {type(normalizer).__name__}")


# --- block kernels ----------------------------------------------------------------------------------------


def _low_precision(dtype: torch.dtype) -> bool:
    """bf16/fp16 heads run their matmuls in their own dtype (fp32 accumulation inside the matmul)."""
    return dtype in (torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exp, softmax and gradient sums: fp32, or fp64 for an fp64 head."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def low_precision_chunk_size(n_tokens: int, vocab: int, budget_bytes: int, *, hidden: int) -> ChunkShape:
    """Block shape for a bf16/fp16 head: as many rows as fit (ideally every token), tiles of at least 1024.

    Each weight-gradient tile is ``G^T x`` summed over a block's rows inside one matmul (fp32 accumulation,
    one rounding); with every token in one block it is written once, like stock's. The working set per block
    is the low-precision and fp32 logits (6 bytes per entry) and the low-precision ``G W`` rows (``2 * hidden``
    bytes per row); with fewer rows than tokens, also an fp32 and a low-precision ``[tile, hidden]``
    accumulator. Row blocks are balanced (no short last block). Few, large blocks: each block is a handful of
    multi-threaded ops, and on a busy CPU every one of them waits for its slowest thread.
    """
    if vocab <= 0 or budget_bytes <= 0 or hidden < 0:
        raise ValueError(f"vocab and budget_bytes must be positive, got vocab={vocab}, budget={budget_bytes}")
    n_tokens = max(n_tokens, 1)
    per_entry = _LOW_PRECISION_ENTRY_BYTES
    tile = (budget_bytes // n_tokens - 2 * hidden) // per_entry
    if tile >= min(vocab, _MIN_LOW_PRECISION_TILE):
        return ChunkShape(n_tokens, vocab if tile >= vocab else _align_down(tile, _TILE_ALIGN))
    tile = min(vocab, _MIN_LOW_PRECISION_TILE)
    rows = (budget_bytes - 6 * tile * hidden) // (tile * per_entry + 2 * hidden)
    rows = max(
        rows, min(n_tokens, _MIN_SINGLE_PASS_ROWS)
    )  # a budget below the [tile, H] sums: still useful rows
    blocks = -(-n_tokens // rows)
    rows = -(-n_tokens // blocks)  # balanced
    if rows > _ROW_ALIGN:
        rows = -(-rows // _ROW_ALIGN) * _ROW_ALIGN
    return ChunkShape(min(n_tokens, rows), tile)


class _Head:
    """The head plus reusable block buffers: accumulation-dtype logit tiles and, for a low-precision head,
    the matmul's own output tile (reused for the gradient tile fed back to the two gradient matmuls)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, rows: int, tile: int
    ) -> None:
        self.weight, self.bias, self.softcap = weight, bias, softcap
        self.vocab, self.hidden = weight.shape
        self.low = _low_precision(weight.dtype)
        self.acc = _acc_dtype(weight.dtype)
        self.rows, self.tile = rows, tile
        kw = {"device": weight.device}
        self.acc_buf = torch.empty(rows * tile, dtype=self.acc, **kw)
        self.low_buf = torch.empty(rows * tile, dtype=weight.dtype, **kw) if self.low else None
        self.cap_buf = torch.empty(rows * tile, dtype=self.acc, **kw) if softcap is not None else None

    def w(self, v0: int, v1: int) -> torch.Tensor:
        """Rows ``[v0, v1)`` of the weight: a view, never a copy (the matmuls run in the weight's dtype)."""
        return self.weight[v0:v1]

    def logits(self, x: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """Logits of vocabulary ``[v0, v1)``: without softcap the matmul's own output (the head's dtype, which
        the next elementwise op reads and widens in one pass); with softcap the capped logits in the
        accumulation dtype, d(capped)/d(raw) kept in ``cap_buf``."""
        rows, width = x.shape[0], v1 - v0
        out = self.acc_buf[: rows * width].view(rows, width)
        mm_out = self.low_buf[: rows * width].view(rows, width) if self.low else out
        if self.bias is None:
            torch.mm(x, self.w(v0, v1).T, out=mm_out)
        else:
            torch.addmm(self.bias[v0:v1], x, self.w(v0, v1).T, out=mm_out)
        if self.softcap is None:
            return mm_out
        if self.low:
            out.copy_(mm_out)
        cap = self.cap_buf[: out.numel()].view_as(out)
        torch.tanh(out.div_(self.softcap), out=cap)
        torch.mul(cap, self.softcap, out=out)
        cap.square_().neg_().add_(1.0)  # d/dy [c * tanh(y / c)] = 1 - tanh^2
        return out

    def target_logits(self, x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Each row's logit of its target (accumulation dtype), as the block matmul computes it: one dot
        product per row in the head's dtype (fp32 accumulation, one rounding, bias included), then softcap."""
        out = torch.empty(x.shape[0], dtype=self.acc, device=x.device)
        for r0, r1 in _spans(x.shape[0], self.rows):
            picked = self.weight.index_select(0, tgt[r0:r1]).unsqueeze(2)
            rows = x[r0:r1].unsqueeze(1)
            if self.bias is None:
                dots = torch.bmm(rows, picked)
            else:
                dots = torch.baddbmm(self.bias.index_select(0, tgt[r0:r1]).view(-1, 1, 1), rows, picked)
            out[r0:r1] = dots.view(-1)
        if self.softcap is not None:
            out = out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def shifted_exp(self, logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``exp(logits - shift[:, None])`` in the accumulation-dtype buffer: widened by a copy first (a
        mixed-dtype ``sub(..., out=)`` would allocate a temporary of the whole block on CPU)."""
        out = self.acc_buf[: logits.numel()].view_as(logits)
        if logits.data_ptr() != out.data_ptr():
            out.copy_(logits)
        return out.sub_(shift.unsqueeze(1)).exp_()

    def matmul_operand(self, probs: torch.Tensor, scale: torch.Tensor, scaled: bool) -> torch.Tensor:
        """``probs * scale`` in the matmul dtype: scaled in place, then rounded into the low-precision buffer
        (``scaled``: already multiplied, for the bias sum). Two passes, not a mixed-dtype ``mul(..., out=)``,
        which would allocate a temporary of the whole block on CPU."""
        if not scaled:
            probs.mul_(scale)
        if not self.low:
            return probs
        return self.low_buf[: probs.numel()].view_as(probs).copy_(probs)


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    """(start, stop) pairs covering ``range(total)``."""
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _lse_pass(head: _Head, x: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and target logit (accumulation dtype).

    Each block stores its row maxima and shifted sums (``[tiles, rows]``, tiny) with ``out=`` ops, and the
    tiles are combined once at the end: five ops per block. Few ops matter on a busy CPU, where each
    multi-threaded op waits for its slowest thread.
    """
    n = x.shape[0]
    tiles = _spans(head.vocab, head.tile)
    row_spans = _spans(n, head.rows)
    logit_dtype = head.weight.dtype if head.low and head.softcap is None else head.acc
    maxes = torch.empty(len(tiles), n, dtype=logit_dtype, device=x.device)
    sums = torch.empty(len(tiles), n, dtype=head.acc, device=x.device)
    for k, (v0, v1) in enumerate(tiles):
        for r0, r1 in row_spans:
            logits = head.logits(x[r0:r1], v0, v1)
            block_max = torch.amax(logits, dim=1, out=maxes[k, r0:r1]).to(head.acc)  # bf16 - bf16 would round
            torch.sum(head.shifted_exp(logits, block_max), dim=1, out=sums[k, r0:r1])
    maxes = maxes.to(head.acc)
    shift = maxes.amax(dim=0)
    lse = sums.mul_(maxes.sub_(shift).exp_()).sum(dim=0).log_().add_(shift)
    return lse, head.target_logits(x, tgt)


@dataclass
class _GradOut:
    """Gradient buffers (None where not wanted): ``input`` rows of the valid tokens in the accumulation dtype,
    ``weight`` in the weight's dtype (each tile written once), ``bias`` in the accumulation dtype."""

    input: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _grad_pass(
    head: _Head, x: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor, out: _GradOut
) -> None:
    """Recompute each block's softmax from ``lse`` and turn it into ``row_scale * (softmax - onehot)``.

    Vocabulary-block by vocabulary-block: a weight-gradient tile sums ``G^T x`` over every row block (in the
    weight's dtype straight into the gradient when one row block holds every token; else in an accumulation
    -dtype ``[tile, H]`` buffer), then is written once. No ``[V, H]`` buffer besides the gradient itself.
    """
    n = x.shape[0]
    row_spans = _spans(n, head.rows)
    split_rows = len(row_spans) > 1
    w_acc = w_part = dx_part = None
    if out.weight is not None and split_rows and head.low:
        w_acc = torch.empty(head.tile, head.hidden, dtype=head.acc, device=x.device)
        w_part = torch.empty(head.tile, head.hidden, dtype=head.weight.dtype, device=x.device)
    if out.input is not None and head.low:
        dx_part = torch.empty(head.rows, head.hidden, dtype=head.weight.dtype, device=x.device)
    tiles = _spans(head.vocab, head.tile)
    # The one-hot, per block one scatter: each target's column in its tile, and -1 in the row of its tile.
    tile_of = torch.div(tgt, head.tile, rounding_mode="floor")
    col = tgt - tile_of * head.tile
    col_last = col.clamp(max=tiles[-1][1] - tiles[-1][0] - 1)  # any valid index: the value there is 0
    tile_ids = torch.arange(len(tiles), device=x.device).unsqueeze(1)
    neg_hit = (tile_of.unsqueeze(0) == tile_ids).to(head.acc).neg_()  # [tiles, rows]
    for k, (v0, v1) in enumerate(tiles):
        width = v1 - v0
        cols = col_last if k == len(tiles) - 1 else col
        for j, (r0, r1) in enumerate(row_spans):
            probs = head.shifted_exp(head.logits(x[r0:r1], v0, v1), lse[r0:r1])
            probs.scatter_add_(1, cols[r0:r1].unsqueeze(1), neg_hit[k, r0:r1].unsqueeze(1))
            if head.softcap is not None:
                probs.mul_(head.cap_buf[: probs.numel()].view_as(probs))
            scale = row_scale[r0:r1].unsqueeze(1) if row_scale.dim() else row_scale
            if out.bias is not None:
                out.bias[v0:v1].add_(probs.mul_(scale).sum(dim=0))
            grad = head.matmul_operand(probs, scale, scaled=out.bias is not None)
            if out.weight is not None:
                tile_grad = out.weight[v0:v1]
                if not split_rows:
                    torch.mm(grad.T, x, out=tile_grad)
                elif not head.low:
                    tile_grad.addmm_(grad.T, x[r0:r1], beta=0.0 if j == 0 else 1.0)
                else:
                    part = torch.mm(grad.T, x[r0:r1], out=w_part[:width])
                    (w_acc[:width].copy_(part) if j == 0 else w_acc[:width].add_(part))
            if out.input is not None:
                if head.low:
                    out.input[r0:r1].add_(torch.mm(grad, head.w(v0, v1), out=dx_part[: r1 - r0]))
                else:
                    out.input[r0:r1].addmm_(grad, head.w(v0, v1))
        if w_acc is not None:
            out.weight[v0:v1].copy_(w_acc[:width])


# --- the op (a torch.library custom op: opaque to torch.compile, with its own autograd) -------------------


def _valid_rows(target: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the non-ignored tokens and their targets; out-of-range targets raise like F.cross_entropy."""
    rows = (target != ignore_index).nonzero().squeeze(1)
    tgt = target.index_select(0, rows)
    if tgt.numel() and bool(((tgt < 0) | (tgt >= vocab)).any()):
        bad = tgt[(tgt < 0) | (tgt >= vocab)][0].item()
        raise ValueError(f"target {bad} is out of range for vocab size {vocab} (ignore_index={ignore_index})")
    return rows, tgt


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]``, without a copy when every row is kept."""
    return t if rows.numel() == t.shape[0] else t.index_select(0, rows)


def _denominator(reduction: str, normalizer: torch.Tensor | None, n_valid: int) -> float:
    """What the summed loss is divided by: the normalizer, the label count for "mean", or 1.

    With no label tokens the sum is 0 and so is the result (a 0 normalizer is accepted only then).
    """
    if normalizer is not None:
        value = float(normalizer.detach().reshape(()).item())
        if not (0 <= value < math.inf):
            raise ValueError(f"normalizer must be a non-negative finite count, got {value}")
        if value == 0 and n_valid:
            raise ValueError(f"normalizer is 0 but the batch has {n_valid} label tokens")
        return value or 1.0
    return float(max(n_valid, 1)) if reduction == "mean" else 1.0


def _forward_impl(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token log-sum-exp (0 where ignored), denominator): the loss in the accumulation dtype,
    ``[N]`` for ``reduction="none"``, else the sum over label tokens divided by the denominator."""
    valid, tgt = _valid_rows(target, ignore_index, weight.shape[0])
    denom = _denominator(reduction, normalizer, valid.numel())  # validates before any compute
    head = _Head(weight, bias, softcap, rows, tile)
    lse_valid, target_logit = _lse_pass(head, _gather_rows(x2d, valid), tgt)
    losses = lse_valid - target_logit
    lse = torch.zeros(x2d.shape[0], dtype=head.acc, device=x2d.device).index_copy_(0, valid, lse_valid)
    if reduction == "none":
        loss = torch.zeros_like(lse).index_copy_(0, valid, losses)
    else:
        loss = losses.sum() / denom
    return loss, lse, torch.tensor(denom, dtype=head.acc, device=x2d.device)


@torch.library.custom_op("automodel_plugins::linear_cross_entropy", mutates_args=())
def _lce_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward as an op torch.compile keeps whole (its host syncs stay inside)."""
    return _forward_impl(x2d, weight, bias, target, normalizer, ignore_index, reduction, softcap, rows, tile)


@_lce_forward.register_fake
def _lce_forward_fake(x2d, weight, bias, target, normalizer, ignore_index, reduction, softcap, rows, tile):
    acc = _acc_dtype(weight.dtype)
    n = x2d.shape[0]
    loss = x2d.new_empty((n,) if reduction == "none" else (), dtype=acc)
    return loss, x2d.new_empty((n,), dtype=acc), x2d.new_empty((), dtype=acc)


def _backward_impl(
    grad_loss: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    tile: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d input, d weight, d bias) in the inputs' dtypes; an empty tensor for each one not wanted."""
    valid = (target != ignore_index).nonzero().squeeze(1)
    tgt = target.index_select(0, valid)
    head = _Head(weight, bias, softcap, rows, tile)
    acc, n_valid = head.acc, valid.numel()
    if reduction == "none":
        row_scale = grad_loss.reshape(-1).index_select(0, valid).to(acc)
    else:
        row_scale = grad_loss.to(acc) / denom
    out = _GradOut(
        input=torch.zeros(n_valid, weight.shape[1], dtype=acc, device=x2d.device) if need_input else None,
        weight=torch.empty_like(weight) if need_weight else None,
        bias=torch.zeros(weight.shape[0], dtype=acc, device=x2d.device) if need_bias else None,
    )
    if n_valid:
        _grad_pass(head, _gather_rows(x2d, valid), tgt, _gather_rows(lse, valid), row_scale, out)
    elif out.weight is not None:
        out.weight.zero_()
    del head  # its block buffers, before the input gradient's casts add theirs (the backward's peak)
    d_input = x2d.new_empty(0)  # each "not wanted" is its own empty tensor: custom-op outputs may not alias
    if out.input is not None:
        d_input = out.input.to(x2d.dtype)
        out.input = None
        if n_valid != x2d.shape[0]:
            d_input = torch.zeros_like(x2d).index_copy_(0, valid, d_input)
    return (
        d_input,
        x2d.new_empty(0) if out.weight is None else out.weight,
        x2d.new_empty(0) if out.bias is None else out.bias.to(bias.dtype),
    )


@torch.library.custom_op("automodel_plugins::linear_cross_entropy_backward", mutates_args=())
def _lce_backward(
    grad_loss: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    tile: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as an op (see :func:`_backward_impl`)."""
    return _backward_impl(
        grad_loss,
        x2d,
        weight,
        bias,
        target,
        lse,
        denom,
        ignore_index,
        reduction,
        softcap,
        rows,
        tile,
        need_input,
        need_weight,
        need_bias,
    )


@_lce_backward.register_fake
def _lce_backward_fake(
    grad_loss,
    x2d,
    weight,
    bias,
    target,
    lse,
    denom,
    ignore_index,
    reduction,
    softcap,
    rows,
    tile,
    need_input,
    need_weight,
    need_bias,
):
    return (
        torch.empty_like(x2d) if need_input else x2d.new_empty(0),
        torch.empty_like(weight) if need_weight else x2d.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else x2d.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x2d, weight, bias, target, _normalizer, ignore_index, reduction, softcap, rows, tile = inputs
    _loss, lse, denom = output
    ctx.save_for_backward(x2d, weight, bias, target, lse, denom)
    ctx.options = (ignore_index, reduction, softcap, rows, tile)
    ctx.mark_non_differentiable(lse, denom)


def _backward(ctx, grad_loss, _grad_lse, _grad_denom, *, backward_fn=None):
    x2d, weight, bias, target, lse, denom = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_input, d_weight, d_bias = (backward_fn or _lce_backward)(
        grad_loss,
        x2d,
        weight,
        bias,
        target,
        lse,
        denom,
        *ctx.options,
        need_input,
        need_weight,
        need_bias and bias is not None,
    )
    return (
        d_input if need_input else None,
        d_weight if need_weight else None,
        d_bias if need_bias and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_lce_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinearCrossEntropy(torch.autograd.Function):
    """The same forward and backward outside the dispatcher: eager calls skip the custom op's dispatch and
    alias checks, and stay visible op by op to dispatch modes (FLOP counters, memory probes)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse, grad_denom):
        return _backward(ctx, grad_loss, grad_lse, grad_denom, backward_fn=_backward_impl)


# --- a scalar loss: the gradients during the forward, three matmuls ---------------------------------------
#
# When the loss reaches autograd as a scalar (reduction "mean" or "sum"), its upstream gradient is one number,
# so the gradients can be formed in the forward (Liger's order) and the backward only scales them: per chunk of
# token rows, one matmul for the logits over the whole vocabulary, softmax in the accumulation dtype, then
# ``G @ W`` and ``G^T x``. Three matmuls in all, as stock, instead of four; and a handful of large ops per chunk.

# Fewer rows of the whole vocabulary than this per chunk make narrow matmuls and many ops: tiles instead.
_MIN_GRAD_ROWS = 16
# A low-precision head's chunk budget in units of default_memory_budget (see _grad_chunk_budget).
_LOW_PRECISION_GRAD_BUDGET = 4


def grad_chunk_rows(
    n_tokens: int, vocab: int, budget_bytes: int, *, dtype: torch.dtype, softcap: bool
) -> int:
    """Token rows per chunk of the gradients-in-forward path (every chunk spans the whole vocabulary), or 0
    when fewer than ``min(n_tokens, 16)`` rows fit ``budget_bytes`` (then vocabulary tiles serve better).

    A chunk holds its logits in the accumulation dtype (plus, for a low-precision head, the matmul's own
    output, reused for the gradient ``G`` fed to the two gradient matmuls; with ``softcap``, the cap's
    derivative in a second accumulation-dtype buffer). The op balances its chunks over the label tokens (no
    short last chunk), so it may use fewer rows than this.
    """
    if vocab <= 0 or budget_bytes <= 0:
        raise ValueError(f"vocab and budget_bytes must be positive, got vocab={vocab}, budget={budget_bytes}")
    n_tokens = max(n_tokens, 1)
    acc_bytes = torch.empty((), dtype=_acc_dtype(dtype)).element_size()
    per_entry = acc_bytes * (2 if softcap else 1)
    if _low_precision(dtype):
        per_entry += torch.empty((), dtype=dtype).element_size()
    rows = budget_bytes // (per_entry * vocab)
    if rows < min(n_tokens, _MIN_GRAD_ROWS):
        return 0
    return min(rows, n_tokens)


def _grad_chunk_budget(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Default bytes of a gradients-in-forward chunk: :func:`default_memory_budget` (1/16 of an fp32 weight
    gradient, at most 64 MiB), four times that for a bf16/fp16 head (half its own weight gradient, at most
    256 MiB): rows enough that each ``dW += G^T x`` product outweighs reading and writing ``dW`` once more,
    and few chunks, so few multi-threaded ops (each of which, on a busy CPU, waits for its slowest thread)."""
    budget = default_memory_budget(vocab, hidden)
    return _LOW_PRECISION_GRAD_BUDGET * budget if _low_precision(dtype) else budget


def _forward_grads_impl(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-token log-sum-exp (0 where ignored), denominator, d input, d weight, d bias), the gradients
    for an upstream gradient of 1.

    Chunk by chunk of ``rows`` label tokens: ``logits = x_c W^T`` (+ bias) in the head's dtype, the softmax in
    the accumulation dtype, ``G = (softmax - onehot) / denominator`` (times the softcap's derivative) rounded
    once to the head's dtype, as stock's logits gradient is; then ``dx_c = G W`` (written once, as stock's) and
    ``dW += G^T x_c`` in the weight's dtype (one rounding per chunk: with one chunk, stock's ``dW``). No fp32
    ``[V, H]`` buffer. Gradients not wanted come back as empty tensors.
    """
    vocab = weight.shape[0]
    valid, tgt = _valid_rows(target, ignore_index, vocab)
    n_valid = valid.numel()
    denom = _denominator(reduction, normalizer, n_valid)  # validates before any compute
    scale = 1.0 / denom
    all_rows = n_valid == x2d.shape[0]
    chunks = -(-max(n_valid, 1) // rows)
    head = _Head(
        weight, bias, softcap, -(-max(n_valid, 1) // chunks), vocab
    )  # balanced over the label tokens
    acc = head.acc
    empty = x2d.new_empty(0)
    d_input = empty
    if need_input:
        d_input = torch.empty_like(x2d) if all_rows else torch.zeros_like(x2d)
    d_weight = torch.empty_like(weight) if need_weight else x2d.new_empty(0)
    d_bias = torch.zeros(vocab, dtype=acc, device=x2d.device) if need_bias else None
    lse = torch.zeros(x2d.shape[0], dtype=acc, device=x2d.device)
    loss = torch.zeros((), dtype=acc, device=x2d.device)
    for j, (r0, r1) in enumerate(_spans(n_valid, head.rows)):
        index = None if all_rows else valid[r0:r1]
        x = x2d[r0:r1] if index is None else x2d.index_select(0, index)
        t = tgt[r0:r1].unsqueeze(1)
        logits = head.logits(x, 0, vocab)
        row_max = logits.amax(dim=1).to(acc)  # bf16 - bf16 would round: the shift in the accumulation dtype
        picked = logits.gather(1, t).squeeze(1).to(acc)  # before the in-place exp below
        probs = head.shifted_exp(logits, row_max)  # exp(logits - max), unnormalized
        sums = probs.sum(dim=1)
        chunk_lse = sums.log().add_(row_max)
        loss += (chunk_lse - picked).sum()
        if index is None:
            lse[r0:r1] = chunk_lse
        else:
            lse.index_copy_(0, index, chunk_lse)
        probs.scatter_add_(1, t, sums.neg().unsqueeze(1))  # exp - sum * onehot = sum * (softmax - onehot)
        if softcap is not None:
            probs.mul_(head.cap_buf[: probs.numel()].view_as(probs))
        grad = head.matmul_operand(probs, sums.reciprocal_().mul_(scale).unsqueeze(1), scaled=False)
        if d_bias is not None:
            d_bias += grad.sum(dim=0, dtype=acc)
        if need_input:
            if index is None:
                torch.mm(grad, weight, out=d_input[r0:r1])
            else:
                d_input.index_copy_(0, index, torch.mm(grad, weight))
        if need_weight:
            (torch.mm(grad.T, x, out=d_weight) if j == 0 else d_weight.addmm_(grad.T, x))
    if need_weight and not n_valid:
        d_weight.zero_()
    return (
        loss / denom,
        lse,
        torch.tensor(denom, dtype=acc, device=x2d.device),
        d_input,
        d_weight,
        empty.new_empty(0) if d_bias is None else d_bias.to(bias.dtype),
    )


@torch.library.custom_op("automodel_plugins::linear_cross_entropy_with_grads", mutates_args=())
def _lce_forward_grads(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    rows: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients-in-forward pass as an op torch.compile keeps whole (see :func:`_forward_grads_impl`)."""
    return _forward_grads_impl(
        x2d,
        weight,
        bias,
        target,
        normalizer,
        ignore_index,
        reduction,
        softcap,
        rows,
        need_input,
        need_weight,
        need_bias,
    )


@_lce_forward_grads.register_fake
def _lce_forward_grads_fake(
    x2d,
    weight,
    bias,
    target,
    normalizer,
    ignore_index,
    reduction,
    softcap,
    rows,
    need_input,
    need_weight,
    need_bias,
):
    acc = _acc_dtype(weight.dtype)
    return (
        x2d.new_empty((), dtype=acc),
        x2d.new_empty((x2d.shape[0],), dtype=acc),
        x2d.new_empty((), dtype=acc),
        torch.empty_like(x2d) if need_input else x2d.new_empty(0),
        torch.empty_like(weight) if need_weight else x2d.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else x2d.new_empty(0),
    )


def _setup_grads_context(ctx, inputs, output) -> None:
    ctx.wanted = inputs[9:12]
    ctx.save_for_backward(*output[3:])
    ctx.mark_non_differentiable(*output[1:])


def _backward_grads(ctx, grad_loss, *_unused):
    """The saved gradients times the upstream scalar (traced by torch.compile: out of place, functional)."""
    grads = [
        g * grad_loss if wanted else None for g, wanted in zip(ctx.saved_tensors, ctx.wanted, strict=True)
    ]
    return (*grads, None, None, None, None, None, None, None, None, None)


_lce_forward_grads.register_autograd(_backward_grads, setup_context=_setup_grads_context)


class _EagerLinearCrossEntropyGrads(torch.autograd.Function):
    """The gradients-in-forward pass in eager mode: the backward scales the gradients in place and hands them
    over (no second ``[V, H]`` tensor). A second backward through the same graph (``retain_graph=True``) finds
    them gone and recomputes them from the saved inputs and log-sum-exp with the tiled backward."""

    @staticmethod
    def forward(ctx, *inputs):
        x2d, weight, bias, target, _normalizer, ignore_index, reduction, softcap, rows = inputs[:9]
        loss, lse, denom, *grads = _forward_grads_impl(*inputs)
        ctx.grads = grads
        ctx.wanted = inputs[9:12]
        ctx.save_for_backward(x2d, weight, bias, target, lse, denom)
        ctx.options = (ignore_index, reduction, softcap, rows, weight.shape[0])
        ctx.mark_non_differentiable(lse, denom)
        return loss, lse, denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_denom):
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward: the first one handed the precomputed gradients over
            grads = _backward_impl(grad_loss, *ctx.saved_tensors, *ctx.options, *ctx.wanted)
        else:
            grads = [g.mul_(grad_loss) if wanted else g for g, wanted in zip(grads, ctx.wanted, strict=True)]
        scaled = [g if wanted else None for g, wanted in zip(grads, ctx.wanted, strict=True)]
        return (*scaled, None, None, None, None, None, None, None, None, None)


def _chunk_shape(
    n_tokens: int,
    weight: torch.Tensor,
    softcap: float | None,
    chunk_size: int | tuple[int, int] | None,
    memory_budget_bytes: int | None,
) -> ChunkShape:
    """The block shape: ``chunk_size`` as given, else chosen for the head's dtype within the budget."""
    vocab, hidden = weight.shape
    n_tokens = max(n_tokens, 1)
    if chunk_size is not None:
        rows, tile = chunk_size if isinstance(chunk_size, tuple) else (chunk_size, vocab)
        return ChunkShape(min(rows, n_tokens), min(tile, vocab))
    if _low_precision(weight.dtype):
        # Twice the fp32 default: larger blocks, fewer multi-threaded ops (see low_precision_chunk_size); still
        # a quarter of the bf16 weight gradient this op returns anyway.
        budget = memory_budget_bytes or 2 * default_memory_budget(vocab, hidden)
        return low_precision_chunk_size(n_tokens, vocab, budget, hidden=hidden)
    budget = memory_budget_bytes or default_memory_budget(vocab, hidden)
    buffers = 2 if softcap is not None else 1  # softcap keeps its derivative in a second tile buffer
    return choose_chunk_size(n_tokens, vocab, budget, hidden=hidden, logit_buffers=buffers)


def _wanted_grads(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[bool, bool, bool]:
    """Which of (input, weight, bias) autograd will ask a gradient for: decided here, outside the op (under
    torch.compile, grad mode and ``requires_grad`` are guarded at trace time)."""
    if not torch.is_grad_enabled():
        return False, False, False
    return x2d.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def _grad_rows(
    n_tokens: int,
    weight: torch.Tensor,
    softcap: float | None,
    chunk_size: int | tuple[int, int] | None,
    memory_budget_bytes: int | None,
) -> int:
    """Rows per chunk of the gradients-in-forward path, or 0 where vocabulary tiles are needed instead."""
    if chunk_size is not None:
        return min(chunk_size[0] if isinstance(chunk_size, tuple) else chunk_size, max(n_tokens, 1))
    vocab, hidden = weight.shape
    budget = memory_budget_bytes or _grad_chunk_budget(vocab, hidden, weight.dtype)
    return grad_chunk_rows(n_tokens, vocab, budget, dtype=weight.dtype, softcap=softcap is not None)


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
    """``F.cross_entropy(input @ weight.T + bias, target)`` computed in blocks, never holding ``[N, V]``.

    Args mirror ``torch.nn.functional.linear_cross_entropy(input, weight, target)`` so the two swap:
    ``input [..., H]``, ``weight [V, H]``, ``target [...]`` (integer, same token count), ``bias [V]``.
    ``reduction``: ``"mean"`` over non-ignored tokens (0, with zero gradients, when every token is ignored),
    ``"sum"``, or ``"none"`` (per-token loss shaped like ``target``, 0 where ignored). ``normalizer``: with
    ``"mean"`` or ``"sum"``, return ``sum / normalizer`` instead (e.g. the label-token count of a whole
    gradient-accumulation batch). ``softcap``: logits become ``softcap * tanh(logits / softcap)``.
    ``chunk_size`` (rows per block, or ``(rows, vocab_tile)``; a tile narrower than the vocabulary selects the
    tiled path) or ``memory_budget_bytes`` (bytes of a block's working set, see :func:`grad_chunk_rows` for a
    scalar loss that needs gradients, :func:`choose_chunk_size` and :func:`low_precision_chunk_size` otherwise)
    override the default, derived from :func:`default_memory_budget`. A scalar loss with gradients forms them
    in the forward and its backward scales them (three matmuls); a second backward through the same graph
    (``retain_graph=True``) recomputes them. Matmuls run in the head's dtype (fp32 accumulation inside the
    matmul, as stock's ``x @ W.T``); log-sum-exp, softmax and gradient sums in fp32. The gradients come back in the
    inputs' dtypes and so does the loss, unless ``loss_dtype`` asks for another floating dtype
    (``torch.float32`` keeps a bf16 model's loss unrounded, as transformers reports it).
    """
    _check_tensors(input, weight, target, bias)
    normalizer_value = _check_options(reduction, normalizer, softcap, chunk_size, memory_budget_bytes)
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be a floating-point torch.dtype, got {loss_dtype!r}")
    x2d = input.reshape(-1, weight.shape[1])
    chunk = _chunk_shape(x2d.shape[0], weight, softcap, chunk_size, memory_budget_bytes)
    if isinstance(normalizer, torch.Tensor):
        normalizer_tensor = normalizer.detach()
    elif normalizer_value is not None:
        normalizer_tensor = torch.tensor(normalizer_value, dtype=torch.float64)
    else:
        normalizer_tensor = None
    softcap = None if softcap is None else float(softcap)
    args = (
        x2d,
        weight,
        bias,
        target.reshape(-1).long(),
        normalizer_tensor,
        int(ignore_index),
        reduction,
        softcap,
    )
    wanted = _wanted_grads(x2d, weight, bias)
    rows = 0
    tiles_asked = isinstance(chunk_size, tuple) and chunk_size[1] < weight.shape[0]
    if reduction != "none" and any(wanted) and not tiles_asked:
        rows = _grad_rows(x2d.shape[0], weight, softcap, chunk_size, memory_budget_bytes)
    if rows:  # a scalar loss: the gradients in the forward, three matmuls
        op = _lce_forward_grads if torch.compiler.is_compiling() else _EagerLinearCrossEntropyGrads.apply
        loss = op(*args, rows, *wanted)[0]
    else:
        op = _lce_forward if torch.compiler.is_compiling() else _EagerLinearCrossEntropy.apply
        loss = op(*args, chunk.rows, chunk.vocab)[0]
    loss = loss.to(loss_dtype or input.dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
