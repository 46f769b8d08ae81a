"""Chunked ("cut") linear cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without ``[N, V]``.

The logits of a large-vocabulary head dominate training memory (``N * V * 4`` bytes, kept twice by autograd).
This op walks the non-ignored tokens in chunks of rows; for each chunk it computes the fp32 logits, their
log-sum-exp and the target logit, and - when gradients are wanted and the loss is a scalar - turns the chunk
straight into its gradient (``softmax - onehot``), accumulating ``dW`` (fp32) and writing ``dinput`` rows.
Backward then only rescales those buffers by ``grad_output``, so forward + backward cost three matmuls, like
the naive path, on 1 chunk of logits at a time. ``reduction="none"`` has a per-token ``grad_output`` that is
unknown in forward: it saves the log-sum-exp and recomputes the chunks in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch

__all__ = ["choose_chunk_size", "default_memory_budget", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_FP32_BYTES = 4
_ROW_ALIGN = 16
_MIN_BUDGET_BYTES = 4 << 20
_MAX_BUDGET_BYTES = 64 << 20
# The fp32 weight gradient (V * H * 4 bytes) is the op's unavoidable extra memory; one chunk of logits is kept
# to this fraction of it so the chunk adds little on top, while still giving the matmuls enough rows.
_WEIGHT_GRAD_FRACTION = 16


def choose_chunk_size(n_tokens: int, vocab: int, budget_bytes: int) -> int:
    """Rows per chunk so that one ``[rows, vocab]`` fp32 logits buffer fits ``budget_bytes``.

    Rounded down to a multiple of 16 (friendlier to matmul kernels) when that many fit; never below 1 row and
    never above ``n_tokens`` (one chunk is enough then).
    """
    if vocab <= 0 or budget_bytes <= 0:
        raise ValueError(f"vocab and budget_bytes must be positive, got vocab={vocab}, budget={budget_bytes}")
    rows = max(1, budget_bytes // (vocab * _FP32_BYTES))
    if rows >= _ROW_ALIGN:
        rows -= rows % _ROW_ALIGN
    return max(1, min(rows, max(n_tokens, 1)))


def default_memory_budget(vocab: int, hidden: int) -> int:
    """Default bytes for one chunk of fp32 logits: 1/16 of the fp32 weight gradient, within [4, 64] MiB."""
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
    chunk_size: int | None,
    memory_budget_bytes: int | None,
) -> None:
    """Raise ValueError/TypeError for option values the op cannot honour."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError('normalizer divides a scalar loss; it cannot be used with reduction="none"')
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer tensor must hold one value, got shape {tuple(normalizer.shape)}"
                )
            value = float(normalizer.detach().reshape(()).item())
        elif isinstance(normalizer, Real) and not isinstance(normalizer, bool):
            value = float(normalizer)
        else:
            raise TypeError(f"normalizer must be a number or a 0-d tensor, got {type(normalizer).__name__}")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"normalizer must be a positive finite count, got {value}")
    if softcap is not None and not (isinstance(softcap, Real) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if memory_budget_bytes is not None and not (
        isinstance(memory_budget_bytes, int) and memory_budget_bytes > 0
    ):
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    if chunk_size is not None and memory_budget_bytes is not None:
        raise ValueError("pass chunk_size or memory_budget_bytes, not both")


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
    normalizer: float | torch.Tensor | None
    softcap: float | None
    chunk_size: int
    need_input_grad: bool
    need_weight_grad: bool
    need_bias_grad: bool

    @property
    def precompute(self) -> bool:
        """Scalar losses with some gradient wanted compute the gradient in forward (grad_output is a scalar)."""
        return self.reduction != "none" and self.any_grad

    @property
    def any_grad(self) -> bool:
        return self.need_input_grad or self.need_weight_grad or self.need_bias_grad


class _Chunks:
    """fp32 copies of the head and reusable chunk buffers; turns row chunks into logits and gradients."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> None:
        self.w32 = weight if weight.dtype == torch.float32 else weight.float()
        self.b32 = None if bias is None else bias.float()
        self.softcap = plan.softcap
        rows, vocab = plan.chunk_size, weight.shape[0]
        self.logits = torch.empty(rows, vocab, dtype=torch.float32, device=weight.device)
        self.capgrad = torch.empty_like(self.logits) if plan.softcap is not None else None
        self.dx_rows = (
            torch.empty(rows, weight.shape[1], dtype=torch.float32, device=weight.device)
            if plan.need_input_grad
            else None
        )

    def compute_logits(self, x32: torch.Tensor) -> torch.Tensor:
        """Fill the chunk buffer with (soft-capped) fp32 logits; with softcap also keep d(capped)/d(raw)."""
        out = self.logits[: x32.shape[0]]
        if self.b32 is None:
            torch.mm(x32, self.w32.T, out=out)
        else:
            torch.addmm(self.b32, x32, self.w32.T, out=out)
        if self.softcap is not None:
            cap = self.capgrad[: x32.shape[0]]
            torch.tanh(out.div_(self.softcap), out=cap)
            torch.mul(cap, self.softcap, out=out)
            cap.square_().neg_().add_(1.0)  # d/dy [c * tanh(y / c)] = 1 - tanh^2
        return out

    def to_logit_grad(self, logits: torch.Tensor, target: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """In place: ``logits`` holding exp(z - shift) becomes (exp(z - shift) - onehot * scale) * dcap/dy."""
        logits.scatter_add_(1, target.unsqueeze(1), onehot.neg().unsqueeze(1))
        if self.softcap is not None:
            logits.mul_(self.capgrad[: logits.shape[0]])
        return logits

    def accumulate(
        self,
        grad_logits: torch.Tensor,
        row_scale: torch.Tensor,
        x32: torch.Tensor,
        rows: torch.Tensor,
        grads: _Grads,
    ) -> None:
        """Add the chunk's ``diag(row_scale) @ grad_logits`` contribution to the three gradients."""
        if grads.input is not None:
            dx = torch.mm(grad_logits, self.w32, out=self.dx_rows[: grad_logits.shape[0]])
            grads.input.index_copy_(0, rows, dx.mul_(row_scale.unsqueeze(1)))
        if grads.weight is not None:
            grads.weight.addmm_(grad_logits.T, x32 * row_scale.unsqueeze(1))
        if grads.bias is not None:
            grads.bias.addmv_(grad_logits.T, row_scale)


@dataclass
class _Grads:
    """fp32 gradient buffers (None where not wanted); rows of ignored tokens stay zero."""

    input: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, n_tokens: int, weight: torch.Tensor, plan: _Plan) -> _Grads:
        vocab, hidden = weight.shape
        kw = {"dtype": torch.float32, "device": weight.device}
        return cls(
            input=torch.zeros(n_tokens, hidden, **kw) if plan.need_input_grad else None,
            weight=torch.zeros(vocab, hidden, **kw) if plan.need_weight_grad else None,
            bias=torch.zeros(vocab, **kw) if plan.need_bias_grad else None,
        )


def _row_chunks(n_rows: int, chunk: int):
    """(start, stop) pairs covering ``range(n_rows)``."""
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


def _gather_fp32(x2d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The chunk's input rows in fp32 (a small copy; the head's matmuls run in fp32)."""
    return x2d.index_select(0, rows).to(torch.float32)


def _forward_chunks(
    x2d: torch.Tensor,
    chunks: _Chunks,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    grads: _Grads | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-valid-row loss and log-sum-exp (fp32); with ``grads``, accumulate the unscaled gradients too."""
    n_valid = rows.numel()
    losses = torch.empty(n_valid, dtype=torch.float32, device=x2d.device)
    lse = torch.empty_like(losses)
    for start, stop in _row_chunks(n_valid, chunks.logits.shape[0]):
        r, t = rows[start:stop], tgt[start:stop]
        x32 = _gather_fp32(x2d, r)
        logits = chunks.compute_logits(x32)
        target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
        shift = logits.amax(dim=1)
        exp = logits.sub_(shift.unsqueeze(1)).exp_()
        sumexp = exp.sum(dim=1)
        torch.add(shift, sumexp.log(), out=lse[start:stop])
        torch.sub(lse[start:stop], target_logit, out=losses[start:stop])
        if grads is not None:
            # softmax - onehot == (exp - onehot * sumexp) / sumexp: the division folds into the row scale.
            grad_logits = chunks.to_logit_grad(exp, t, sumexp)
            chunks.accumulate(grad_logits, sumexp.reciprocal(), x32, r, grads)
    return losses, lse


def _backward_chunks(
    x2d: torch.Tensor,
    chunks: _Chunks,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    grads: _Grads,
) -> None:
    """Recompute each chunk's softmax from the saved log-sum-exp and accumulate ``row_scale``-weighted grads."""
    for start, stop in _row_chunks(rows.numel(), chunks.logits.shape[0]):
        r, t = rows[start:stop], tgt[start:stop]
        x32 = _gather_fp32(x2d, r)
        probs = chunks.compute_logits(x32).sub_(lse[start:stop].unsqueeze(1)).exp_()
        grad_logits = chunks.to_logit_grad(probs, t, torch.ones_like(lse[start:stop]))
        chunks.accumulate(grad_logits, row_scale[start:stop], x32, r, grads)


# --- autograd ---------------------------------------------------------------------------------------------


def _denominator(plan: _Plan, n_valid: int, device: torch.device) -> torch.Tensor:
    """What the summed loss is divided by: the normalizer, the label count for "mean" (1 if none), or 1."""
    if plan.normalizer is not None:
        return torch.as_tensor(plan.normalizer, dtype=torch.float32, device=device).detach().reshape(())
    count = n_valid if plan.reduction == "mean" else 1
    return torch.tensor(float(max(count, 1)), dtype=torch.float32, device=device)


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
        chunks = _Chunks(weight, bias, plan)
        grads = _Grads.zeros(x2d.shape[0], weight, plan) if plan.precompute else None
        losses, lse = _forward_chunks(x2d, chunks, rows, tgt, grads)
        del chunks  # free the chunk buffers (and any fp32 copy of the head) before returning
        denom = _denominator(plan, rows.numel(), x2d.device)
        if plan.reduction == "none":
            out = torch.zeros(target.shape[0], dtype=torch.float32, device=x2d.device)
            out.index_copy_(0, rows, losses)
        else:
            out = losses.sum() / denom
        ctx.plan, ctx.grads, ctx.denom = plan, grads, denom
        ctx.save_for_backward(x2d, weight, bias, rows, tgt, lse)
        return out.to(x2d.dtype)

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
            grads = _Grads.zeros(x2d.shape[0], weight, plan)
            if plan.reduction == "none":
                row_scale = grad_out.reshape(-1).index_select(0, rows).to(torch.float32)
            else:
                row_scale = (grad_out.to(torch.float32) / ctx.denom).expand(rows.numel())
            _backward_chunks(x2d, _Chunks(weight, bias, plan), rows, tgt, lse, row_scale, grads)
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
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(input @ weight.T + bias, target)`` computed in row chunks, never holding ``[N, V]``.

    Args mirror ``torch.nn.functional.linear_cross_entropy(input, weight, target)`` so the two swap:
    ``input [..., H]``, ``weight [V, H]``, ``target [...]`` (integer, same token count), ``bias [V]``.
    ``reduction``: ``"mean"`` over non-ignored tokens (0, with zero gradients, when every token is ignored),
    ``"sum"``, or ``"none"`` (per-token loss shaped like ``target``, 0 where ignored). ``normalizer``: with
    ``"mean"`` or ``"sum"``, return ``sum / normalizer`` instead (e.g. the label-token count of a whole
    gradient-accumulation batch). ``softcap``: logits become ``softcap * tanh(logits / softcap)``.
    ``chunk_size`` (rows per chunk) or ``memory_budget_bytes`` (bytes of fp32 logits per chunk) override the
    default chunking, :func:`default_memory_budget`. Logits, log-sum-exp and gradient accumulation run in
    fp32; the loss and gradients come back in the inputs' dtypes.
    """
    _check_tensors(input, weight, target, bias)
    _check_options(reduction, normalizer, softcap, chunk_size, memory_budget_bytes)
    vocab, hidden = weight.shape
    x2d = input.reshape(-1, hidden)
    target1d = target.reshape(-1).long()
    grad_on = torch.is_grad_enabled()
    if chunk_size is None:
        budget = memory_budget_bytes or default_memory_budget(vocab, hidden)
        buffers = 2 if softcap is not None else 1  # softcap keeps its derivative in a second chunk buffer
        chunk_size = choose_chunk_size(x2d.shape[0], vocab, max(1, budget // buffers))
    plan = _Plan(
        reduction=reduction,
        normalizer=normalizer,
        softcap=None if softcap is None else float(softcap),
        chunk_size=max(1, min(chunk_size, max(x2d.shape[0], 1))),
        need_input_grad=grad_on and input.requires_grad,
        need_weight_grad=grad_on and weight.requires_grad,
        need_bias_grad=grad_on and bias is not None and bias.requires_grad,
    )
    out = _LinearCrossEntropy.apply(x2d, weight, bias, target1d, int(ignore_index), plan)
    return out.reshape(target.shape) if reduction == "none" else out
