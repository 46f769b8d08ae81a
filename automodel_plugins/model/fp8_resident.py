"""What every FP8-resident module shares (:class:`~automodel_plugins.model.fp8_linear.Fp8Linear`,
:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`): the frozen ``uint8`` code parameter
(:class:`Fp8Codes`), the base that keeps codes and fp32 scales out of dtype casts (:class:`Fp8Resident`), and the
dequantizing matmul whose autograd graph keeps only the codes (:func:`fp8_matmul`, over a :class:`DequantLayout`).

Why ``uint8`` codes, fp32 scale buffers and dequantize-then-matmul: see :mod:`automodel_plugins.model.fp8_linear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from automodel_plugins.errors import DtypeMismatchError, FrozenFp8WeightError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import decode_activation_scale
from automodel_plugins.model.placement import is_dtensor, local_region, write_local

if TYPE_CHECKING:
    from automodel_plugins.model.quantization_record import QuantizationRecord

__all__ = [
    "DequantLayout",
    "Fp8Codes",
    "Fp8Resident",
    "check_resident_state_dict",
    "dequantize_rows",
    "fp8_matmul",
    "linear_dequantized",
    "linear_dequantized_input_grad",
    "modules_of_type",
]

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
    origin: tuple[int, int] | None = None
    """Codes that are a shard of the weight (tensor parallelism): where they start in it, row and column (the
    block scales are the whole grid's, so a shard may start inside a block). None: the codes are the weight."""


def dequantize_rows(
    codes: torch.Tensor, scale: torch.Tensor, layout: DequantLayout, r0: int, r1: int
) -> torch.Tensor:
    """Rows ``r0:r1`` of the codes (a weight, or the shard at ``layout.origin``), dequantized into the compute
    dtype."""
    rows, cols = codes.shape
    part = codes[r0:r1].view(layout.fp8_dtype)
    region = None
    if layout.block_size is not None and ((r0, r1) != (0, rows) or layout.origin is not None):
        top, left = layout.origin or (0, 0)
        region = (slice(top + r0, top + r1), slice(left, left + cols))
    return dequantize(part, scale, dtype=layout.compute_dtype, block_size=layout.block_size, region=region)


def _row_chunks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def linear_dequantized(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    layout: DequantLayout,
) -> torch.Tensor:
    """``F.linear(x, dequantized weight, bias)``, one weight (or one block of its rows) alive at a time."""
    rows = codes.shape[0]
    if layout.rows_per_chunk >= rows:
        weight = dequantize_rows(codes, scale, layout, 0, rows)
        return F.linear(x, weight, bias)
    out = None
    for r0, r1 in _row_chunks(rows, layout.rows_per_chunk):
        weight = dequantize_rows(codes, scale, layout, r0, r1)
        part = F.linear(x, weight, None if bias is None else bias[r0:r1])
        del weight
        if out is None:
            out = part.new_empty(*part.shape[:-1], rows)
        out[..., r0:r1] = part
    return out


def linear_dequantized_input_grad(
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    layout: DequantLayout,
    x_dtype: torch.dtype,
) -> torch.Tensor:
    """``grad_out @ weight``, the weight dequantized again (whole, or a block of rows at a time)."""
    rows = codes.shape[0]
    if layout.rows_per_chunk >= rows:
        weight = dequantize_rows(codes, scale, layout, 0, rows).to(grad_out.dtype)
        return grad_out.matmul(weight).to(x_dtype)
    grad_x = None
    for r0, r1 in _row_chunks(rows, layout.rows_per_chunk):
        weight = dequantize_rows(codes, scale, layout, r0, r1).to(grad_out.dtype)
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
        return linear_dequantized(x, codes, scale, bias, layout)

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = linear_dequantized_input_grad(grad_out, codes, scale, ctx.layout, ctx.x_dtype)
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
    the codes; otherwise directly, the dequantized weight dropped on return. While dynamo traces
    (``torch.compile``), the same code runs as the custom op ``automodel_plugins::fp8_linear``, registered by
    :mod:`~automodel_plugins.model.fp8_ops` (which ``Fp8Linear`` and ``Fp8Experts`` import)."""
    if torch.compiler.is_compiling() and layout.origin is None:  # a tensor-parallel shard: traced as written
        block = None if layout.block_size is None else list(layout.block_size)
        return torch.ops.automodel_plugins.fp8_linear(
            x, codes, scale, bias, layout.fp8_dtype, block, layout.compute_dtype, layout.rows_per_chunk
        )
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_graph:
        return linear_dequantized(x, codes, scale, bias, layout)
    return _Fp8LinearFunction.apply(x, codes, scale, bias, layout)


class Fp8Resident(nn.Module):
    """What every FP8-resident module shares: frozen ``uint8`` code parameters (:attr:`CODE_NAMES`, each an
    :class:`Fp8Codes`) beside fp32 scale buffers (:attr:`SCALE_NAMES`), which dtype casts never touch and
    ``state_dict()`` shows in the FP8 dtype the checkpoint stores.

    Subclasses set ``fp8_dtype`` and ``compute_dtype`` and implement :meth:`fp32_scale_of`.
    """

    CODE_NAMES: tuple[str, ...] = ()
    SCALE_NAMES: tuple[str, ...] = ()
    ACTIVATION_NAMES: tuple[str, ...] = ()
    """The static activation scale buffer of each code (transformers' names), ``None`` unless the checkpoint
    stores one (``activation_scheme: "static"``). Never used by this module's forward (it does not quantize
    activations): kept so that a stock ``save_pretrained`` writes what a static config promises and transformers'
    FP8 layers need."""
    fp8_dtype: torch.dtype
    compute_dtype: torch.dtype
    quantization_record: QuantizationRecord | None = None
    """The model's record of its ``quantization_config``, shared by its resident modules; set at load."""
    module_name: str | None = None
    """This module's name in the model the loader made it resident in."""
    shown_as: tuple[tuple[str, str, tuple[int, ...] | None], ...] = ()
    """``(buffer, key, shape)`` for each scale buffer ``state_dict()`` shows under the checkpoint format's own
    name and shape (``shape`` None: the buffer's), and ``load_state_dict`` takes under either name: a
    compressed-tensors source's ``weight_scale`` / ``input_scale`` (:func:`show_scales_as`). Empty:
    transformers' FP8 names, the buffers' own."""

    def show_scales_as(self, shown: tuple[tuple[str, str, tuple[int, ...] | None], ...]) -> None:
        """Show scale buffers in ``state_dict()`` as ``(buffer, key, shape)`` says (see :attr:`shown_as`)."""
        for buffer, _, shape in shown:
            if buffer not in (*self.SCALE_NAMES, *self.ACTIVATION_NAMES):
                raise KeyError(f"{type(self).__name__} has no scale buffer {buffer!r}")
            held = self._buffers.get(buffer)
            if shape is not None and held is not None and math.prod(shape) != held.numel():
                raise ValueError(f"{buffer!r} of shape {tuple(held.shape)} cannot be shown as {shape}")
        self.shown_as = tuple(shown)

    def state_key(self, buffer: str) -> str:
        """The ``state_dict()`` key (within this module) of the scale buffer ``buffer``."""
        return next((key for name, key, _ in self.shown_as if name == buffer), buffer)

    def __getattr__(self, name: str) -> Any:
        # every key state_dict() shows is an attribute too, as torch.distributed.checkpoint expects (_get_fqns)
        for buffer, key, shape in self.__dict__.get("shown_as", ()):
            if key == name:
                value = super().__getattr__(buffer)
                return value if shape is None or value is None else value.reshape(shape)
        return super().__getattr__(name)

    def mark_fp8(self, held: bool) -> None:
        """Say that the model holds this module's FP8 weights again (``held``), or that a dequantized stock module
        replaces it (a LoRA merge): the model's ``quantization_config`` then names it as it is held
        (:mod:`~automodel_plugins.model.quantization_record`). Every merge and unmerge path calls this."""
        if self.quantization_record is not None and self.module_name is not None:
            self.quantization_record.mark(self.module_name, held)

    def fp32_scale_of(self, name: str, scale: torch.Tensor) -> torch.Tensor:
        """The scale buffer ``name`` holding ``scale`` as stored (any scale dtype and layout that fits)."""
        raise NotImplementedError

    @property
    def activation_count(self) -> int:
        """How many values each static activation scale holds when built: one per tensor (one per expert for
        experts; under expert parallelism a rank's buffer stays a DTensor of all of them)."""
        return 1

    def init_activation_scales(self, present: bool, device: torch.device | str | None = None) -> None:
        """Register every :attr:`ACTIVATION_NAMES` buffer: fp32 ones (to be loaded) when ``present``, else None
        (no key in ``state_dict()``, as transformers' dynamic layers have none)."""
        shape = () if self.activation_count == 1 else (self.activation_count,)
        for name in self.ACTIVATION_NAMES:
            value = torch.ones(shape, dtype=torch.float32, device=device) if present else None
            self.register_buffer(name, value)

    def load_activation_scale(self, name: str, scale: torch.Tensor) -> None:
        """Hold ``scale`` (as stored: any float dtype, 0-d or ``[1]``; ``[E]`` for experts) as the fp32 static
        activation scale ``name``; a module still on meta takes it as it is, a materialized one copies it."""
        buffer = self._buffers.get(name)
        if name not in self.ACTIVATION_NAMES or buffer is None:
            raise KeyError(f"{type(self).__name__} holds no static activation scale {name!r}")
        # a DTensor's numel is the global one: the whole stored scale is read, this rank's part kept
        value = decode_activation_scale(scale, buffer.numel(), key=name)
        if buffer.is_meta:
            self._buffers[name] = value.to(self._device())
            return
        region = local_region(buffer)  # expert parallelism: this rank's experts
        write_local(buffer, (value if region is None else value[region]).to(buffer.device))

    def _device(self) -> torch.device:
        codes = self._parameters.get(self.CODE_NAMES[0])
        return codes.device if codes is not None and not codes.is_meta else torch.device("cpu")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp8Resident:
        """``model.to(bf16)`` / ``.half()`` / ``.float()`` change the compute dtype (and float parameters such
        as a bias), never the codes (an integer tensor is left alone by casts) nor the fp32 scales, which only
        follow device moves."""
        scales = {name: self._buffers.get(name) for name in (*self.SCALE_NAMES, *self.ACTIVATION_NAMES)}
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

    def check_codes_dtype(self, key: str, dtype: torch.dtype) -> None:
        """Only this layer's FP8 codes load into it: its FP8 dtype, or ``uint8`` (the same bytes). torch's
        ``copy_`` would cast anything else (BF16 weights, another FP8 format) into meaningless codes, silently."""
        if dtype in (self.fp8_dtype, torch.uint8):
            return
        kind = type(self).__name__
        if is_fp8(dtype):
            raise DtypeMismatchError(
                f"{dtype} codes cannot be loaded into an {kind} holding {self.fp8_dtype} codes: the same bytes "
                "mean other numbers in another FP8 format",
                key=key,
            )
        raise DtypeMismatchError(
            f"a {dtype} value cannot be loaded into the FP8 codes of an {kind} (FP8-resident, dequantize=False: "
            f"it holds {self.fp8_dtype} codes and a scale; a cast would make the values meaningless codes). "
            "Load these weights into a model loaded with dequantize=True, or re-quantize them first, "
            "deliberately: model.load_state_dict(automodel_plugins.requantize_state_dict(model, state_dict))",
            key=key,
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.CODE_NAMES:
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].view(self.fp8_dtype)
        for buffer, key, shape in self.shown_as:  # last in the module's keys, as the buffers were: same order
            value = destination.pop(prefix + buffer, None)
            if value is not None:
                destination[prefix + key] = value if shape is None else value.reshape(shape)  # a view

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        shown = {prefix + buffer: prefix + key for buffer, key, _ in self.shown_as}
        for internal, key in shown.items():  # the shown name wins: it is what state_dict() gave the caller
            if key in state_dict:
                state_dict[internal] = state_dict.pop(key)
        for name in self.CODE_NAMES:
            codes = state_dict.get(prefix + name)
            if isinstance(codes, torch.Tensor):
                self.check_codes_dtype(prefix + name, codes.dtype)
                state_dict[prefix + name] = codes.view(torch.uint8)
        for name in self.SCALE_NAMES:
            scale, buffer = state_dict.get(prefix + name), self._buffers.get(name)
            if (
                scale is not None
                and buffer is not None
                and (scale.dtype != torch.float32 or tuple(scale.shape) != tuple(buffer.shape))
            ):
                state_dict[prefix + name] = self.fp32_scale_of(name, scale)
        for name in self.ACTIVATION_NAMES:
            scale, buffer = state_dict.get(prefix + name), self._buffers.get(name)
            if (
                isinstance(scale, torch.Tensor)
                and buffer is not None
                and (scale.dtype != torch.float32 or tuple(scale.shape) != tuple(buffer.shape))
            ):
                key = shown.get(prefix + name, prefix + name)
                state_dict[prefix + name] = decode_activation_scale(scale, buffer.numel(), key=key)
        missing, unexpected = len(missing_keys), len(unexpected_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        missing_keys[missing:] = [
            shown.get(key, key) for key in missing_keys[missing:]
        ]  # as the caller named them
        unexpected_keys[unexpected:] = [shown.get(key, key) for key in unexpected_keys[unexpected:]]
        self._rewrap_codes()


def modules_of_type(model: nn.Module, kind: type[M]) -> dict[str, M]:
    """Every module of ``model`` that is a ``kind``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, kind)}


def check_resident_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A ``load_state_dict`` pre-hook for a model holding FP8-resident modules: refuses a value no resident
    module can take as codes (:meth:`Fp8Resident.check_codes_dtype`) before the load copies anything, so a
    refused load leaves the whole model as it was (each module checks again when the load reaches it)."""
    for name, resident in modules_of_type(module, Fp8Resident).items():
        for code_name in resident.CODE_NAMES:
            key = f"{prefix}{name}.{code_name}" if name else f"{prefix}{code_name}"
            value = state_dict.get(key)
            if isinstance(value, torch.Tensor):
                resident.check_codes_dtype(key, value.dtype)
