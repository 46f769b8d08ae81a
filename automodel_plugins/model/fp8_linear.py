"""FP8-resident linear layers: a frozen ``nn.Linear`` that keeps the checkpoint's FP8 weight (1 byte a
parameter) and its scale, and dequantizes one layer at a time in the forward.

What :class:`Fp8Linear` holds:

* ``weight``: the checkpoint's FP8 codes, byte for byte, as a frozen ``uint8`` parameter
  (:class:`~automodel_plugins.model.fp8_resident.Fp8Codes`). The bytes are stored as ``uint8`` rather than as
  ``float8_e4m3fn`` on purpose: gloo
  cannot all-gather float8 (an FSDP2 unit holding only FP8 parameters fails), a ``MixedPrecisionPolicy`` would
  cast float8 parameters to its ``param_dtype`` before the all-gather (twice the bytes on the wire), and
  ``model.to(torch.bfloat16)`` would turn the codes into unscaled values. None of these touch an integer
  tensor. ``state_dict()`` still shows the weight in its FP8 dtype (:attr:`Fp8Linear.codes`), and
  ``load_state_dict`` accepts it, so the checkpoint's layout round-trips.
* ``weight_scale_inv``: the fp32 multiplier, a persistent buffer (FSDP2 refuses 0-d parameters, and a buffer is
  replicated, never cast by a mixed-precision policy): 0-d per tensor, or the ``ceil(out/bm) x ceil(in/bn)``
  grid of block FP8 (partial edge blocks included). ``scale_dtype`` remembers how the checkpoint stored it.
* ``activation_scale``: the checkpoint's static input scale (``activation_scheme: "static"``), a 0-d fp32
  persistent buffer named and shaped as transformers' ``FP8Linear`` declares it, or None when the checkpoint has
  none (dynamic activations). The forward never reads it (activations are not quantized here); it is kept so that
  a stock ``save_pretrained`` writes it and transformers' FP8 GPU path finds it.

Under a compressed-tensors ``quantization_config`` the loader has ``state_dict()`` show both scales as that
format names and shapes them (``weight_scale`` ``[1]`` / ``[out, 1]`` / grid, ``input_scale`` ``[1]``; views of
these buffers), and ``load_state_dict`` take them (:mod:`~automodel_plugins.model.compressed_tensors_state`).

The forward dequantizes with the loader's own :func:`~automodel_plugins.fp8.decode.dequantize` (fp32 product,
one rounding to ``compute_dtype``: bit-identical to a dequantize-at-load model) and runs ``F.linear``; the
dequantized copy dies before the layer returns. Under autograd,
:func:`~automodel_plugins.model.fp8_resident.fp8_matmul` saves **only the
FP8 codes and the scale** and dequantizes again in backward for the input gradient; the weight gets none.
A weight whose dequantized copy would exceed :attr:`Fp8Linear.dequant_budget_bytes` is processed in blocks of
rows, so the transient stays within the budget (results then equal within rounding, not bit for bit).

Under tensor parallelism (``ColwiseParallel`` / ``RowwiseParallel``: the codes a DTensor split by rows or
columns, the scale whole on every rank) the forward runs the same math on the local shard
(:mod:`~automodel_plugins.model.fp8_tensor_parallel`).

``torch._scaled_mm`` is not used: in torch 2.13 it multiplies two FP8 operands (W8A8), so it would quantize the
activations and change the result by FP8's precision, far beyond the tolerance of a dequantized model; it has
no BF16 x FP8 (weight-only) or block-scaled CPU path. The same dequantize-then-matmul code runs on CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from automodel_plugins.errors import ScaleError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import decode_scale, grid_shape
from automodel_plugins.model.fp8_ops import fp8_dequantize_op  # also registers the resident matmul op
from automodel_plugins.model.fp8_resident import (
    DequantLayout,
    Fp8Codes,
    Fp8Resident,
    dequantize_rows,
    fp8_matmul,
    modules_of_type,
)
from automodel_plugins.model.placement import is_dtensor, write_local

__all__ = ["ACTIVATION_NAME", "DEFAULT_DEQUANT_BUDGET_BYTES", "SCALE_NAME", "Fp8Linear", "fp8_linear_modules"]

DEFAULT_DEQUANT_BUDGET_BYTES = 256 * 2**20
"""Above this many bytes of dequantized weight, a layer dequantizes and multiplies a block of rows at a time."""

SCALE_NAME = "weight_scale_inv"
ACTIVATION_NAME = "activation_scale"


class Fp8Linear(Fp8Resident, nn.Linear):
    """A frozen linear layer holding its checkpoint FP8 weight and scale; dequantizes one layer at a time.

    An ``nn.Linear`` subclass, so PEFT wraps it with its stock ``lora.Linear``; ``compute_dtype`` (bnb's
    convention, read by PEFT) is the dtype the weight is dequantized into and the dtype PEFT gives adapters.
    """

    dequant_budget_bytes: int = DEFAULT_DEQUANT_BUDGET_BYTES
    CODE_NAMES = ("weight",)
    SCALE_NAMES = (SCALE_NAME,)
    ACTIVATION_NAMES = (ACTIVATION_NAME,)

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
        static_activation: bool = False,
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
        self.init_activation_scales(static_activation, device)
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
        activation_scale: torch.Tensor | None = None,
    ) -> Fp8Linear:
        """A layer holding ``codes`` (FP8, used as they are, not copied), ``scale`` (any stored dtype) and the
        static ``activation_scale`` when there is one."""
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
            static_activation=activation_scale is not None,
            device="meta",
        )
        layer.weight = Fp8Codes(codes.view(torch.uint8))
        layer.weight_scale_inv = layer.fp32_scale(scale)
        if activation_scale is not None:
            layer.load_activation_scale(ACTIVATION_NAME, activation_scale)
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

    def load_fp8(
        self, codes: torch.Tensor, scale: torch.Tensor, activation_scale: torch.Tensor | None = None
    ) -> None:
        """Hold ``codes`` (FP8: the whole weight, or the region this rank's shard holds) and ``scale`` (the
        whole scale as stored), and the static ``activation_scale`` of a layer built with one. A layer still on
        meta takes the tensors as they are (the codes may be memory-mapped from the checkpoint, never copied);
        a materialized one copies them into its storage."""
        if not is_fp8(codes.dtype):
            raise TypeError(f"FP8 codes expected, got {codes.dtype}")
        scale32 = self.fp32_scale(scale).to(codes.device)
        if self.weight.is_meta:
            self.weight = Fp8Codes(codes.view(torch.uint8))
            self._buffers[SCALE_NAME] = scale32
        else:
            write_local(self.weight, codes.view(torch.uint8))
            write_local(self.weight_scale_inv, scale32)
        if activation_scale is not None:
            self.load_activation_scale(ACTIVATION_NAME, activation_scale)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight in ``dtype`` (default: the compute dtype): what a dequantize-at-load model holds."""
        if is_dtensor(self.weight):
            raise NotImplementedError(
                "the whole weight of a sharded (DTensor) Fp8Linear is on several ranks: merge_lora merges a "
                "sharded model shard by shard; to dequantize, gather the codes (full_tensor()) first"
            )
        if torch.compiler.is_compiling():  # one opaque op in the graph, the same code inside
            block = None if self.block_size is None else list(self.block_size)
            return fp8_dequantize_op(
                self.weight, self.weight_scale_inv, self.fp8_dtype, block, dtype or self.compute_dtype
            )
        layout = self._layout(dtype or self.compute_dtype, whole=True)
        return dequantize_rows(self.weight, self.weight_scale_inv, layout, 0, self.out_features)

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

    def _layout(
        self, dtype: torch.dtype, *, whole: bool = False, origin: tuple[int, int] | None = None
    ) -> DequantLayout:
        row_bytes = max(1, self.in_features * dtype.itemsize)
        rows = self.out_features if whole else max(1, self.dequant_budget_bytes // row_bytes)
        return DequantLayout(self.fp8_dtype, self.block_size, dtype, rows, origin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_dtensor(self.weight):  # tensor parallelism (FSDP2 hands the forward a plain unsharded tensor)
            from automodel_plugins.model.fp8_tensor_parallel import sharded_fp8_linear

            return sharded_fp8_linear(self, x)
        return fp8_matmul(x, self.weight, self.weight_scale_inv, self.bias, self._layout(self.compute_dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self._fp8_repr()
        )


def fp8_linear_modules(model: nn.Module) -> dict[str, Fp8Linear]:
    """Every :class:`Fp8Linear` in ``model`` by module name."""
    return modules_of_type(model, Fp8Linear)
