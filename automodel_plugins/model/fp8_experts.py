"""FP8-resident fused MoE experts: a frozen stand-in for a transformers fused-experts module (Qwen3-VL-MoE's
``Qwen3VLMoeTextExperts``) that keeps the checkpoint's FP8 expert weights (1 byte a parameter) and their block
scales, and dequantizes one expert's matrix at a time in the forward.

What :class:`Fp8Experts` holds, named as the module it replaces and transformers' own ``FP8Experts``:

* ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``: the FP8 codes, byte for byte, as frozen ``uint8``
  parameters (:class:`~automodel_plugins.model.fp8_resident.Fp8Codes`, for the reasons given for ``Fp8Linear``:
  gloo, mixed-precision policies and ``model.to(dtype)`` leave integers alone). ``state_dict()`` shows them in
  their FP8 dtype.
* ``gate_up_proj_scale_inv [E, ceil(2I/bm), ceil(H/bn)]`` and ``down_proj_scale_inv``: one fp32 block grid
  per expert matrix (persistent buffers, replicated under FSDP2 like ``Fp8Linear``'s scale).

The forward follows the model's ``experts_implementation`` (``config._experts_implementation``, read at every
call as the stock module reads it, so ``model.set_experts_implementation`` applies):

* ``"eager"`` (and no config, as a stock module standing alone): the stock eager loop
  (``Qwen3VLMoeTextExperts.forward``: one-hot mask, the experts hit, gate|up chunked, activation, down, routing
  weight, ``index_add_``), with each ``F.linear(x, W[e])`` taken by
  :func:`~automodel_plugins.model.fp8_resident.fp8_matmul` over ``W[e]``'s codes: the loader's own
  dequantization (fp32 product, one rounding), so the result is bit-identical to a dequantize-at-load model run
  eagerly; the exact reference.
* ``"grouped_mm"`` (stock's default) and ``"batched_mm"``: :func:`~automodel_plugins.model.fp8_grouped.
  grouped_experts_forward`, stock's grouped path with only the hit experts dequantized into a reused buffer and
  one grouped matmul. ``batched_mm`` runs it too: stock's ``batched_mm`` gathers one weight matrix per
  (token, expert) pair, which from FP8 codes would mean dequantizing each hit expert once per token.

Under autograd only the codes (and the routing) are saved for backward. Only block-scaled FP8 is held (the FP8
releases' form); one scale per expert (``[E, 1, 1]``, Mistral Small 4's fused form) is held as a grid whose single
block covers the whole expert matrix; other per-tensor forms are dequantized at load instead.

PEFT LoRA on the fused tensors (``target_parameters``) reaches the forward as deltas its wrapper attaches
(:mod:`~automodel_plugins.model.fp8_experts_lora`): each hit expert's matrix is then dequantized + delta, formed
per run of hit experts (:mod:`~automodel_plugins.model.fp8_experts_delta`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from automodel_plugins.errors import ExpertsImplementationError, FrozenFp8WeightError, ScaleError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import decode_scale
from automodel_plugins.fp8.stacked import stacked_grid_shape
from automodel_plugins.model import fp8_ops  # noqa: F401  (registers the resident matmul op)
from automodel_plugins.model.fp8_experts_delta import ExpertDelta, active_deltas, fp8_lora_experts_linear
from automodel_plugins.model.fp8_grouped import (
    ExpertGroups,
    GroupedLinear,
    fp8_grouped_linear,
    grouped_experts_forward,
)
from automodel_plugins.model.fp8_resident import (
    DequantLayout,
    Fp8Codes,
    Fp8Resident,
    fp8_matmul,
    modules_of_type,
)
from automodel_plugins.model.placement import is_dtensor, write_local

__all__ = [
    "EXPERTS_IMPLEMENTATIONS",
    "EXPERT_PROJECTIONS",
    "Fp8Experts",
    "fp8_experts_modules",
    "fused_experts_shapes",
]

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
"""The fused parameters of a transformers experts module, in order: ``[E, 2I, H]`` and ``[E, H, I]``."""
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
"""The ``experts_implementation`` values :class:`Fp8Experts` runs (stock's CUDA kernels ``deepgemm``,
``sonicmoe`` and its FP8-experts functions take dequantized or re-quantized weights of their own)."""


def fused_experts_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]] | None:
    """The shapes of ``module``'s fused expert parameters when it is a transformers experts module whose
    forward :class:`Fp8Experts` reproduces (gate and up concatenated along dim 1, ``[out, in]`` matrices, no
    bias, a gate, and an eager forward that is ``Qwen3VLMoeTextExperts``' to the bytecode: transformers copies
    that loop into Mixtral, Qwen2/3-MoE, DeepSeek-V3 and others); else ``None``."""
    if isinstance(module, Fp8Experts):
        return None
    params = {name: getattr(module, name, None) for name in EXPERT_PROJECTIONS}
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params.values()):
        return None  # before the bytecode check: a model without experts never imports the reference's module
    if not _runs_the_reference_loop(type(module)):
        return None
    layout = (
        getattr(module, "is_transposed", False),
        getattr(module, "has_bias", False),
        getattr(module, "has_gate", True),
        getattr(module, "is_concatenated", True),
    )
    if layout != (False, False, True, True) or not hasattr(module, "act_fn"):
        return None
    experts, two_i, hidden = params["gate_up_proj"].shape
    if tuple(params["down_proj"].shape) != (experts, hidden, two_i // 2) or two_i % 2:
        return None
    if getattr(module, "num_experts", experts) != experts:
        return None
    return {name: tuple(int(s) for s in p.shape) for name, p in params.items()}  # type: ignore[misc]


def _runs_the_reference_loop(kind: type) -> bool:
    """Whether ``kind``'s eager forward is, instruction for instruction, the loop :meth:`Fp8Experts.forward`
    copies (``use_experts_implementation`` keeps it as ``__wrapped__``)."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    code = _eager_code(kind)
    return code is not None and code == _eager_code(Qwen3VLMoeTextExperts)


@functools.cache
def _eager_code(kind: type) -> tuple | None:
    forward = getattr(kind, "forward", None)
    code = getattr(getattr(forward, "__wrapped__", forward), "__code__", None)
    return None if code is None else (code.co_code, code.co_names, code.co_consts, code.co_varnames)


class Fp8Experts(Fp8Resident):
    """Frozen fused MoE experts holding their checkpoint FP8 codes and block scales (see the module doc)."""

    CODE_NAMES = EXPERT_PROJECTIONS
    SCALE_NAMES = tuple(f"{name}_scale_inv" for name in EXPERT_PROJECTIONS)
    ACTIVATION_NAMES = tuple(f"{name}_activation_scale" for name in EXPERT_PROJECTIONS)
    """``[E]`` fp32 static activation scales, one per expert (transformers' ``FP8Experts`` names and shape)."""
    dequant_budget_bytes: int = 256 << 20
    """The grouped path dequantizes at most this many bytes of hit experts at a time (at least one expert):
    more hit experts are processed a run at a time, each run one grouped matmul (the same products)."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        *,
        block_size: tuple[int, int],
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype = torch.bfloat16,
        scale_dtype: torch.dtype = torch.float32,
        static_activation: bool = False,
        device: torch.device | str | None = None,
        config: Any = None,
    ) -> None:
        super().__init__()
        # the stock module's (text) config, shared with the model: its _experts_implementation picks the forward
        self.config = config
        if not is_fp8(fp8_dtype):
            raise TypeError(f"{fp8_dtype} is not an FP8 weight dtype")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.fp8_dtype, self.compute_dtype, self.scale_dtype = fp8_dtype, compute_dtype, scale_dtype
        for name, shape in self.shapes.items():
            setattr(self, name, Fp8Codes(torch.empty(shape, dtype=torch.uint8, device=device)))
            self.register_buffer(
                f"{name}_scale_inv",
                torch.ones(stacked_grid_shape(shape, self.block_size), dtype=torch.float32, device=device),
            )
        self.init_activation_scales(static_activation, device)

    @classmethod
    def replacing(
        cls,
        module: nn.Module,
        *,
        block_size: tuple[int, int],
        fp8_dtype: torch.dtype,
        scale_dtype: torch.dtype = torch.float32,
        static_activation: bool = False,
        device: torch.device | str | None = "meta",
    ) -> Fp8Experts:
        """The stand-in for the transformers experts ``module`` (its shapes, activation and compute dtype)."""
        shapes = fused_experts_shapes(module)
        if shapes is None:
            raise TypeError(
                f"{type(module).__name__} is not a fused experts module Fp8Experts can stand in for"
            )
        experts, two_i, hidden = shapes["gate_up_proj"]
        return cls(
            experts,
            hidden,
            two_i // 2,
            module.act_fn,
            block_size=block_size,
            fp8_dtype=fp8_dtype,
            compute_dtype=module.gate_up_proj.dtype,
            scale_dtype=scale_dtype,
            static_activation=static_activation,
            device=device,
            config=getattr(module, "config", None),
        )

    @property
    def experts_implementation(self) -> str:
        """What the forward runs: the config's ``_experts_implementation`` (``"eager"`` without one, as a stock
        experts module standing alone falls back to its eager loop)."""
        return getattr(self.config, "_experts_implementation", None) or "eager"

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    @property
    def activation_count(self) -> int:
        return self.num_experts

    def codes(self, name: str) -> torch.Tensor:
        """The codes of ``name`` (``gate_up_proj`` or ``down_proj``) in their FP8 dtype (a view)."""
        return getattr(self, name).view(self.fp8_dtype)

    def scale(self, name: str) -> torch.Tensor:
        return self._buffers[f"{name}_scale_inv"]

    def fp32_scale_of(self, name: str, scale: torch.Tensor) -> torch.Tensor:
        experts, rows, cols = self.shapes[name.removesuffix("_scale_inv")]
        expected = stacked_grid_shape((experts, rows, cols), self.block_size)
        held = self._buffers.get(name)
        if held is not None and is_dtensor(
            held
        ):  # a split grid (expert tensor parallelism): this rank's part
            expected = tuple(held.to_local().shape)
        if tuple(scale.shape) != expected:
            raise ScaleError(
                f"scale of shape {tuple(scale.shape)} does not fit {name!r}: expected {expected} "
                f"(one block grid of {self.block_size} per expert)"
            )
        return decode_scale(scale)

    def load_fp8(self, name: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Hold ``codes`` (``uint8`` or FP8: the whole fused tensor, or this rank's shard of it) and ``scale``
        (the whole fp32 stacked grid). On meta the tensors are taken as they are; a materialized module copies
        them into its storage."""
        if name not in EXPERT_PROJECTIONS:
            raise KeyError(f"{name!r} is not one of {EXPERT_PROJECTIONS}")
        codes = codes.view(torch.uint8)
        if getattr(self, name).is_meta:
            setattr(self, name, Fp8Codes(codes))
        else:
            write_local(getattr(self, name), codes)
        self.load_scale(name, scale)

    def load_scale(self, name: str, scale: torch.Tensor) -> None:
        """Hold ``scale`` (the whole stacked grid, or this rank's experts' grids under expert parallelism, any
        scale dtype) as ``name``'s fp32 scale buffer."""
        buffer_name = f"{name}_scale_inv"
        buffer = self._buffers[buffer_name]
        device = getattr(self, name).device
        scale32 = self.fp32_scale_of(buffer_name, scale).to(buffer.device if not buffer.is_meta else device)
        if buffer.is_meta:
            self._buffers[buffer_name] = scale32
        else:
            write_local(buffer, scale32)

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole fused tensor in ``dtype`` (default: the compute dtype): what a dequantize-at-load model
        holds, one expert matrix dequantized at a time."""
        dtype = dtype or self.compute_dtype
        codes, scale = self.codes(name), self.scale(name)
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
        for expert in range(codes.shape[0]):
            out[expert] = dequantize(codes[expert], scale[expert], dtype=dtype, block_size=self.block_size)
        return out

    def _layout(self) -> DequantLayout:
        return DequantLayout(self.fp8_dtype, self.block_size, self.compute_dtype, rows_per_chunk=1 << 62)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if parametrize.is_parametrized(self):
            raise FrozenFp8WeightError(
                "the fused parameters of FP8-resident experts (Fp8Experts) hold FP8 codes: a parametrization of "
                "them (a stock PEFT ParamWrapper) would add to the codes, not to the weights. PEFT LoRA with "
                "target_parameters on the experts works through automodel_plugins' PEFT hook, installed by a "
                "dequantize=False load or by automodel_plugins.model.fp8_peft_hook.install() before get_peft_model"
            )
        if is_dtensor(self.gate_up_proj):
            raise NotImplementedError(
                "Fp8Experts with DTensor codes in the forward: expert parallelism runs through "
                "automodel_plugins.parallelize_experts (which hands the forward this rank's experts as local "
                "tensors); tensor parallelism of the experts runs through automodel_plugins.parallelize_experts_tp"
            )
        implementation = self.experts_implementation
        deltas = active_deltas(self)  # LoRA on the experts (target_parameters), attached by its PEFT wrapper
        if implementation in ("grouped_mm", "batched_mm"):
            linear = self._lora_grouped_linear(deltas) if deltas else None
            return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights, linear)
        if implementation != "eager":
            raise ExpertsImplementationError(
                None,
                f"experts_implementation={implementation!r} is not one FP8-resident experts (Fp8Experts) run: "
                f"choose one of {EXPERTS_IMPLEMENTATIONS} (model.set_experts_implementation), or load with "
                "dequantize=True to use it",
            )
        return self._eager_forward(hidden_states, top_k_index, top_k_weights, deltas)

    def _eager_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        deltas: Mapping[str, tuple[ExpertDelta, ...]],
    ) -> torch.Tensor:
        """The stock eager loop over the hit experts, each matrix dequantized on its own (the exact reference);
        with LoRA deltas, each hit expert's matrix formed as dequantized + delta
        (:func:`~automodel_plugins.model.fp8_experts_delta.fp8_lora_experts_linear`, one ``torch.mm``)."""
        layout, budget = self._layout(), self.dequant_budget_bytes
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        def project(name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
            codes, scale = getattr(self, name), self.scale(name)
            if name in deltas:
                groups = ExpertGroups((expert,), (x.shape[0],), x.shape[0])
                return fp8_lora_experts_linear(
                    x, codes, scale, groups, layout, budget, deltas[name], grouped=False
                )
            return fp8_matmul(x, codes[expert], scale[expert], None, layout)

        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            gate, up = project("gate_up_proj", hidden_states[token_idx], e).chunk(2, dim=-1)
            current_hidden_states = project("down_proj", self.act_fn(gate) * up, e)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states

    def _lora_grouped_linear(self, deltas: Mapping[str, tuple[ExpertDelta, ...]]) -> GroupedLinear:
        """The grouped path's projection with LoRA deltas on the tensors that have them."""
        layout, budget = self._layout(), self.dequant_budget_bytes

        def linear(x: torch.Tensor, name: str, groups: ExpertGroups) -> torch.Tensor:
            codes, scale = getattr(self, name), self.scale(name)
            if name in deltas:
                return fp8_lora_experts_linear(x, codes, scale, groups, layout, budget, deltas[name])
            return fp8_grouped_linear(x, codes, scale, groups, layout, budget)

        return linear

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, experts_implementation={self.experts_implementation}, "
            + self._fp8_repr()
        )


def fp8_experts_modules(model: nn.Module) -> dict[str, Fp8Experts]:
    """Every :class:`Fp8Experts` in ``model`` by module name."""
    return modules_of_type(model, Fp8Experts)
