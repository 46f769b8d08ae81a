"""FP8-resident linear layers: a frozen ``nn.Linear`` that keeps the checkpoint's FP8 weight (1 byte a
parameter) and its scale, and dequantizes one layer at a time in the forward.

What :class:`Fp8Linear` holds:

* ``weight``: the checkpoint's FP8 codes, byte for byte, as a frozen ``uint8`` parameter
  (:class:`Fp8Codes`). The bytes are stored as ``uint8`` rather than as ``float8_e4m3fn`` on purpose: gloo
  cannot all-gather float8 (an FSDP2 unit holding only FP8 parameters fails), a ``MixedPrecisionPolicy`` would
  cast float8 parameters to its ``param_dtype`` before the all-gather (twice the bytes on the wire), and
  ``model.to(torch.bfloat16)`` would turn the codes into unscaled values. None of these touch an integer
  tensor. ``state_dict()`` still shows the weight in its FP8 dtype (:attr:`Fp8Linear.codes`), and
  ``load_state_dict`` accepts it, so the checkpoint's layout round-trips.
* ``weight_scale_inv``: the fp32 multiplier, a persistent buffer (FSDP2 refuses 0-d parameters, and a buffer is
  replicated, never cast by a mixed-precision policy): 0-d per tensor, or the ``ceil(out/bm) x ceil(in/bn)``
  grid of block FP8 (partial edge blocks included). ``scale_dtype`` remembers how the checkpoint stored it.

The forward dequantizes with the loader's own :func:`~automodel_plugins.fp8.decode.dequantize` (fp32 product,
one rounding to ``compute_dtype``: bit-identical to a dequantize-at-load model) and runs ``F.linear``; the
dequantized copy dies before the layer returns. Under autograd, :func:`fp8_matmul` saves **only the
FP8 codes and the scale** and dequantizes again in backward for the input gradient; the weight gets none.
A weight whose dequantized copy would exceed :attr:`Fp8Linear.dequant_budget_bytes` is processed in blocks of
rows, so the transient stays within the budget (results then equal within rounding, not bit for bit).

``torch._scaled_mm`` is not used: in torch 2.13 it multiplies two FP8 operands (W8A8), so it would quantize the
activations and change the result by FP8's precision, far beyond the tolerance of a dequantized model; it has
no BF16 x FP8 (weight-only) or block-scaled CPU path. The same dequantize-then-matmul code runs on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from automodel_plugins.errors import FrozenFp8WeightError, ScaleError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.fp8.scales import decode_scale, grid_shape
from automodel_plugins.model import fp8_peft_hook  # noqa: F401  (PEFT's merge over Fp8Linear)
from automodel_plugins.model.fp8_ops import fp8_dequantize_op, fp8_linear_op
from automodel_plugins.model.placement import is_dtensor, write_local

__all__ = [
    "DEFAULT_DEQUANT_BUDGET_BYTES",
    "DequantLayout",
    "Fp8Codes",
    "Fp8Linear",
    "Fp8Resident",
    "fp8_linear_modules",
    "fp8_matmul",
    "modules_of_type",
    "sync_quantization_config",
]

DEFAULT_DEQUANT_BUDGET_BYTES = 256 * 2**20
"""Above this many bytes of dequantized weight, a layer dequantizes and multiplies a block of rows at a time."""

SCALE_NAME = "weight_scale_inv"
M = TypeVar("M", bound=nn.Module)


class Fp8Codes(nn.Parameter):
    """The FP8 codes of an :class:`Fp8Linear` as a frozen ``uint8`` parameter that refuses to require grad.

    ``requires_grad_(True)`` (also through ``model.requires_grad_()``) and ``requires_grad = True`` raise
    :class:`~automodel_plugins.errors.FrozenFp8WeightError` instead of silently training nothing. (Under FSDP2
    the parameter becomes a DTensor ``nn.Parameter``; torch itself then refuses gradients for its integer dtype.)
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> Fp8Codes:
        if requires_grad:
            raise FrozenFp8WeightError(_FROZEN_MESSAGE)
        if data is not None and data.dtype != torch.uint8:
            raise TypeError(f"Fp8Codes holds the FP8 bytes as uint8, got {data.dtype}")
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> Fp8Codes:
        if requires_grad:
            raise FrozenFp8WeightError(_FROZEN_MESSAGE)
        return self

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return torch._C.TensorBase.requires_grad.__get__(self)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:
            raise FrozenFp8WeightError(_FROZEN_MESSAGE)
        torch._C.TensorBase.requires_grad.__set__(self, False)

    def __deepcopy__(self, memo: dict[int, Any]) -> Fp8Codes:
        if id(self) not in memo:
            memo[id(self)] = Fp8Codes(self.data.clone(memory_format=torch.preserve_format))
        return memo[id(self)]

    def __repr__(self) -> str:
        return f"Fp8Codes({tuple(self.shape)}, uint8 bytes of FP8 codes, frozen)"


_FROZEN_MESSAGE = (
    "an FP8-resident weight (Fp8Linear.weight) is frozen: it holds the checkpoint's FP8 codes and cannot "
    "require gradients; train adapters on it (PEFT LoRA), or load with dequantize=True to train the base weights"
)


@dataclass(frozen=True)
class DequantLayout:
    """What the dequantizing matmul needs to know about a weight besides its codes and scale."""

    fp8_dtype: torch.dtype
    block_size: tuple[int, int] | None
    compute_dtype: torch.dtype
    rows_per_chunk: int


def _dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, layout: DequantLayout, r0: int, r1: int
) -> torch.Tensor:
    """Rows ``r0:r1`` of the weight, dequantized into the compute dtype."""
    rows, cols = codes.shape
    part = codes[r0:r1].view(layout.fp8_dtype)
    region = None
    if layout.block_size is not None and (r0, r1) != (0, rows):
        region = (slice(r0, r1), slice(0, cols))
    return dequantize(part, scale, dtype=layout.compute_dtype, block_size=layout.block_size, region=region)


def _row_chunks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _fp8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    layout: DequantLayout,
) -> torch.Tensor:
    """``F.linear(x, dequantized weight, bias)``, one weight (or one block of its rows) alive at a time."""
    rows = codes.shape[0]
    if layout.rows_per_chunk >= rows:
        weight = _dequantize_rows(codes, scale, layout, 0, rows)
        return F.linear(x, weight, bias)
    out = None
    for r0, r1 in _row_chunks(rows, layout.rows_per_chunk):
        weight = _dequantize_rows(codes, scale, layout, r0, r1)
        part = F.linear(x, weight, None if bias is None else bias[r0:r1])
        del weight
        if out is None:
            out = part.new_empty(*part.shape[:-1], rows)
        out[..., r0:r1] = part
    return out


def _fp8_linear_input_grad(
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    layout: DequantLayout,
    x_dtype: torch.dtype,
) -> torch.Tensor:
    """``grad_out @ weight``, the weight dequantized again (whole, or a block of rows at a time)."""
    rows = codes.shape[0]
    if layout.rows_per_chunk >= rows:
        weight = _dequantize_rows(codes, scale, layout, 0, rows).to(grad_out.dtype)
        return grad_out.matmul(weight).to(x_dtype)
    grad_x = None
    for r0, r1 in _row_chunks(rows, layout.rows_per_chunk):
        weight = _dequantize_rows(codes, scale, layout, r0, r1).to(grad_out.dtype)
        part = grad_out[..., r0:r1].matmul(weight)
        grad_x = part if grad_x is None else grad_x.add_(part)
        del weight
    return grad_x.to(x_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """``F.linear`` over an FP8 weight whose graph keeps the FP8 codes, never a dequantized copy."""

    @staticmethod
    def forward(ctx: Any, x, codes, scale, bias, layout: DequantLayout):  # type: ignore[override]
        ctx.save_for_backward(codes, scale)
        ctx.layout, ctx.x_dtype = layout, x.dtype
        return _fp8_linear(x, codes, scale, bias, layout)

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _fp8_linear_input_grad(grad_out, codes, scale, ctx.layout, ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


def fp8_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    layout: DequantLayout,
) -> torch.Tensor:
    """``F.linear(x, dequantized codes, bias)`` for 2-D ``uint8`` ``codes`` and their fp32 ``scale``: under
    autograd (``x`` or ``bias`` requiring grad) through :class:`_Fp8LinearFunction`, whose graph keeps only
    the codes; otherwise directly, the dequantized weight dropped on return. Under ``torch.compile`` the same
    code runs as the custom op ``automodel_plugins::fp8_linear`` (:mod:`~automodel_plugins.model.fp8_ops`)."""
    if torch.compiler.is_compiling():
        block = None if layout.block_size is None else list(layout.block_size)
        return fp8_linear_op(
            x, codes, scale, bias, layout.fp8_dtype, block, layout.compute_dtype, layout.rows_per_chunk
        )
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_graph:
        return _fp8_linear(x, codes, scale, bias, layout)
    return _Fp8LinearFunction.apply(x, codes, scale, bias, layout)


class Fp8Resident(nn.Module):
    """What every FP8-resident module shares: frozen ``uint8`` code parameters (:attr:`CODE_NAMES`, each an
    :class:`Fp8Codes`) beside fp32 scale buffers (:attr:`SCALE_NAMES`), which dtype casts never touch and
    ``state_dict()`` shows in the FP8 dtype the checkpoint stores.

    Subclasses set ``fp8_dtype`` and ``compute_dtype`` and implement :meth:`fp32_scale_of`.
    """

    CODE_NAMES: tuple[str, ...] = ()
    SCALE_NAMES: tuple[str, ...] = ()
    fp8_dtype: torch.dtype
    compute_dtype: torch.dtype

    def fp32_scale_of(self, name: str, scale: torch.Tensor) -> torch.Tensor:
        """The scale buffer ``name`` holding ``scale`` as stored (any scale dtype and layout that fits)."""
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Resident:
        """``model.to(bf16)`` / ``.half()`` / ``.float()`` change the compute dtype (and float parameters such
        as a bias), never the codes (an integer tensor is left alone by casts) nor the fp32 scales, which only
        follow device moves."""
        scales = {name: self._buffers.get(name) for name in self.SCALE_NAMES}
        present = [t for t in (*scales.values(), *(self._parameters.get(n) for n in self.CODE_NAMES))]
        device = next((t.device for t in present if t is not None), torch.device("cpu"))
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        if fn(torch.empty(0, dtype=torch.uint8, device=device)).dtype != torch.uint8:
            raise TypeError(
                f"this cast would change the FP8 codes of an {type(self).__name__} (it casts integer tensors "
                "too, like Module.type()); use model.to(dtype), which changes the compute dtype and keeps the codes"
            )
        for name in scales:
            self._buffers[name] = None  # the key stays in place: state_dict order is unchanged
        try:
            super()._apply(fn, recurse)
        finally:
            for name, scale in scales.items():
                if scale is not None:
                    keeps_dtype = fn(torch.empty(0, dtype=scale.dtype, device=device)).dtype == scale.dtype
                    self._buffers[name] = fn(scale) if keeps_dtype else scale.to(device=probe.device)
        self._rewrap_codes()
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def _fp8_repr(self) -> str:
        """The ``extra_repr`` part every FP8-resident module shares."""
        return (
            f"fp8={str(self.fp8_dtype).removeprefix('torch.')}, block_size={self.block_size}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )

    def _rewrap_codes(self) -> None:
        """Casts and ``load_state_dict(assign=True)`` hand back plain parameters: make them frozen codes again."""
        for name in self.CODE_NAMES:
            codes = self._parameters.get(name)
            if codes is not None and not isinstance(codes, Fp8Codes) and not is_dtensor(codes):
                self._parameters[name] = Fp8Codes(codes.data)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.CODE_NAMES:
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].view(self.fp8_dtype)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in self.CODE_NAMES:
            codes = state_dict.get(prefix + name)
            if codes is not None and is_fp8(codes.dtype):
                state_dict[prefix + name] = codes.view(torch.uint8)
        for name in self.SCALE_NAMES:
            scale, buffer = state_dict.get(prefix + name), self._buffers.get(name)
            if (
                scale is not None
                and buffer is not None
                and (scale.dtype != torch.float32 or tuple(scale.shape) != tuple(buffer.shape))
            ):
                state_dict[prefix + name] = self.fp32_scale_of(name, scale)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rewrap_codes()


class Fp8Linear(Fp8Resident, nn.Linear):
    """A frozen linear layer holding its checkpoint FP8 weight and scale; dequantizes one layer at a time.

    An ``nn.Linear`` subclass, so PEFT wraps it with its stock ``lora.Linear``; ``compute_dtype`` (bnb's
    convention, read by PEFT) is the dtype the weight is dequantized into and the dtype PEFT gives adapters.
    """

    dequant_budget_bytes: int = DEFAULT_DEQUANT_BUDGET_BYTES
    CODE_NAMES = ("weight",)
    SCALE_NAMES = (SCALE_NAME,)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: tuple[int, int] | None = None,
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype = torch.bfloat16,
        scale_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialize a float weight
        if not is_fp8(fp8_dtype):
            raise TypeError(f"{fp8_dtype} is not an FP8 weight dtype")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = None if block_size is None else (int(block_size[0]), int(block_size[1]))
        self.fp8_dtype = fp8_dtype
        self.compute_dtype = compute_dtype
        self.scale_dtype = scale_dtype
        self.weight = Fp8Codes(torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer(SCALE_NAME, torch.ones(self.scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_fp8(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        *,
        block_size: tuple[int, int] | None,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Fp8Linear:
        """A layer holding ``codes`` (FP8, used as they are, not copied) and ``scale`` (any stored dtype)."""
        if not is_fp8(codes.dtype) or codes.dim() != 2:
            raise TypeError(
                f"codes must be a 2-D FP8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}"
            )
        layer = cls(
            codes.shape[1],
            codes.shape[0],
            bias is not None,
            block_size=block_size,
            fp8_dtype=codes.dtype,
            compute_dtype=compute_dtype,
            scale_dtype=scale.dtype,
            device="meta",
        )
        layer.weight = Fp8Codes(codes.view(torch.uint8))
        layer.weight_scale_inv = layer.fp32_scale(scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute_dtype))  # trainable, as nn.Linear's
        return layer

    # --- what a saver (and anyone) reads

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """``()`` per tensor, else the scale grid of the weight."""
        if self.block_size is None:
            return ()
        return grid_shape((self.out_features, self.in_features), self.block_size)

    @property
    def codes(self) -> torch.Tensor:
        """The FP8 codes in their FP8 dtype (a view of ``weight``; a DTensor view when sharded)."""
        return self.weight.view(self.fp8_dtype)

    def fp32_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` as stored (fp32, bf16, E8M0 bytes; 0-d, ``[1]`` or the grid) -> this layer's fp32 buffer."""
        if scale.numel() != math.prod(self.scale_shape):
            raise ScaleError(
                f"scale of shape {tuple(scale.shape)} does not fit weight {(self.out_features, self.in_features)} "
                f"with block size {self.block_size}: expected {self.scale_shape}"
            )
        return decode_scale(scale).reshape(self.scale_shape)

    def fp32_scale_of(self, name: str, scale: torch.Tensor) -> torch.Tensor:
        return self.fp32_scale(scale)

    def load_fp8(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Hold ``codes`` (FP8: the whole weight, or the region this rank's shard holds) and ``scale`` (the
        whole scale as stored). A layer still on meta takes the tensors as they are (the codes may be
        memory-mapped from the checkpoint, never copied); a materialized one copies them into its storage."""
        if not is_fp8(codes.dtype):
            raise TypeError(f"FP8 codes expected, got {codes.dtype}")
        scale32 = self.fp32_scale(scale).to(codes.device)
        if self.weight.is_meta:
            self.weight = Fp8Codes(codes.view(torch.uint8))
            self._buffers[SCALE_NAME] = scale32
            return
        write_local(self.weight, codes.view(torch.uint8))
        write_local(self.weight_scale_inv, scale32)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight in ``dtype`` (default: the compute dtype): what a dequantize-at-load model holds."""
        if torch.compiler.is_compiling():  # one opaque op in the graph, the same code inside
            block = None if self.block_size is None else list(self.block_size)
            return fp8_dequantize_op(
                self.weight, self.weight_scale_inv, self.fp8_dtype, block, dtype or self.compute_dtype
            )
        layout = self._layout(dtype or self.compute_dtype, whole=True)
        return _dequantize_rows(self.weight, self.weight_scale_inv, layout, 0, self.out_features)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A stock ``nn.Linear`` holding the dequantized weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype
        )
        linear.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=self.bias.requires_grad)
        return linear

    # --- compute

    def _layout(self, dtype: torch.dtype, *, whole: bool = False) -> DequantLayout:
        row_bytes = max(1, self.in_features * dtype.itemsize)
        rows = self.out_features if whole else max(1, self.dequant_budget_bytes // row_bytes)
        return DequantLayout(self.fp8_dtype, self.block_size, dtype, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_dtensor(self.weight):  # FSDP2 hands the forward a plain unsharded tensor; TP would not
            raise NotImplementedError(
                "Fp8Linear under tensor parallelism (a DTensor weight in the forward) is not supported; "
                "shard FP8-resident layers with FSDP2, or load with dequantize=True"
            )
        return fp8_matmul(x, self.weight, self.weight_scale_inv, self.bias, self._layout(self.compute_dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self._fp8_repr()
        )


def modules_of_type(model: nn.Module, kind: type[M]) -> dict[str, M]:
    """Every module of ``model`` that is a ``kind``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, kind)}


def fp8_linear_modules(model: nn.Module) -> dict[str, Fp8Linear]:
    """Every :class:`Fp8Linear` in ``model`` by module name."""
    return modules_of_type(model, Fp8Linear)


def sync_quantization_config(model: nn.Module) -> str | None:
    """Make ``model.config.quantization_config`` say what the model holds, so that a stock ``save_pretrained``
    writes a checkpoint transformers reads as it is: every plain ``nn.Linear`` not yet covered (a merged LoRA
    layer, now in the compute dtype) joins ``modules_to_not_convert``; with no FP8-resident module left (layer
    or experts), the quantization is dropped. Returns the method dropped, or None."""
    config = getattr(model, "config", None)
    quantization = quantization_dict(config) if config is not None else None
    if quantization is None:
        return None
    if not modules_of_type(model, Fp8Resident):
        del config.quantization_config
        return str(quantization.get("quant_method"))
    skipped = list(quantization.get("modules_to_not_convert") or [])
    covered = tuple(skipped)
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not any(name == m or name.startswith(m + ".") for m in covered):
            skipped.append(name)
    quantization["modules_to_not_convert"] = skipped
    config.quantization_config = quantization
    return None
