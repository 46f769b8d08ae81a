"""PEFT LoRA on FP8-resident fused experts (``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])``, the config one writes for the dequantized stock model).

PEFT wraps each targeted parameter in a ``lora.ParamWrapper`` (nested when a module has two), which, for the
length of the forward, parametrizes the wrapped tensor as ``W + scaling * lhs @ rhs``. On
:class:`~automodel_plugins.model.fp8_experts.Fp8Experts` ``W`` is ``uint8`` codes, so the
:mod:`~automodel_plugins.model.fp8_peft_hook` turns every ``ParamWrapper`` over one into an
:class:`Fp8ExpertsParamWrapper` (a subclass with no state of its own), which keeps PEFT's adapters, shapes,
initialisation, ``save_pretrained`` / ``from_pretrained`` and forward, and changes only what touches ``W``:

* ``_activate_lora`` attaches the adapters' factors (``get_delta_factors``, in the experts' compute dtype) to
  the experts instead of parametrizing the codes; the experts' forward adds them expert by expert
  (:mod:`~automodel_plugins.model.fp8_experts_delta`). Under expert parallelism the factors keep PEFT's global
  shapes (``lora_A [r * E, in]``, ``lora_B [out, r * E]``: the file a one-process run saves) as DTensors on the
  EP mesh holding this rank's experts' rows only
  (:func:`~automodel_plugins.model.expert_parallel.lora_factor_placements`: ``Shard(0)`` and
  ``_StridedShard(1, split_factor=r)``), split by :func:`~automodel_plugins.model.expert_parallel.parallelize_experts`
  or, when PEFT comes after it, by ``update_layer``; the forward reads the local factors as PEFT reads the whole
  ones. PEFT's ``save_pretrained`` gathers them (every rank calls it), and ``load_state_dict`` of whole factors
  (``PeftModel.from_pretrained``, ``set_peft_model_state_dict``) keeps each rank's experts' rows;
* the adapters live in the experts' compute dtype as stock's live in its weight's dtype;
* ``merge`` adds the delta expert by expert and re-quantizes the moved experts with fresh scales
  (:mod:`~automodel_plugins.model.fp8_experts_merge`); ``unmerge`` restores the codes bit for bit. So PEFT's
  ``merge_and_unload`` (and :func:`~automodel_plugins.merge_lora`) leave an FP8-resident ``Fp8Experts``.

Importing this module imports PEFT.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from automodel_plugins.errors import ExpertParallelError
from automodel_plugins.model.expert_parallel import EP_LORA_MESH, lora_factor_placements
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_experts_delta import ExpertDelta, attached_deltas
from automodel_plugins.model.fp8_experts_merge import MergeRecord, merge_expert_delta, restore_merged
from automodel_plugins.model.placement import is_dtensor

__all__ = ["Fp8ExpertsParamWrapper", "adopt_experts_wrapper"]

_RECORDS = "_fp8_merge_records"


def adopt_experts_wrapper(layer: nn.Module) -> None:
    """Make ``layer``, when it is exactly PEFT's ``ParamWrapper``, an :class:`Fp8ExpertsParamWrapper`."""
    if type(layer) is ParamWrapper:
        layer.__class__ = Fp8ExpertsParamWrapper


class Fp8ExpertsParamWrapper(ParamWrapper):
    """PEFT's ``ParamWrapper`` over an :class:`Fp8Experts` tensor (see the module doc)."""

    def _experts(self) -> Fp8Experts:
        return self.get_base_layer()

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Stock moves the adapters to the wrapped tensor's device and dtype; the codes are ``uint8``, so here:
        their device and the experts' compute dtype."""
        experts = self._experts()
        device = getattr(experts, self.parameter_name).device
        for layer_name in self.adapter_layer_names + self.other_param_names:
            layer = getattr(self, layer_name, None)
            if not isinstance(layer, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in layer:
                continue
            if any(p.device.type == "meta" for p in layer.parameters()):
                continue
            item = layer[adapter_name]
            requires_grad = getattr(item, "requires_grad", None)
            layer[adapter_name] = item.to(device, dtype=experts.compute_dtype)
            if requires_grad is not None:
                layer[adapter_name].requires_grad = requires_grad

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        """PEFT's, then, over experts already split by expert, the new adapter's factors split with them."""
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        mesh = getattr(self._experts(), EP_LORA_MESH, None)
        if mesh is not None:
            self.shard_lora_over_experts(mesh, adapter_names=[adapter_name])

    def shard_lora_over_experts(self, ep_mesh: Any, adapter_names: list[str] | None = None) -> None:
        """Make every adapter's factors (or ``adapter_names``') DTensors on ``ep_mesh`` holding this rank's experts'
        rows (:func:`~automodel_plugins.model.expert_parallel.lora_factor_placements`). On meta nothing is
        allocated; materialized factors are taken from rank 0 (a collective), so every rank holds the rows of
        one initialization, as one process seeded like rank 0 does."""
        from torch.distributed.tensor import distribute_tensor

        for adapter in adapter_names or list(self.lora_A):
            for layers, placement in zip(
                (self.lora_A, self.lora_B), lora_factor_placements(self.r[adapter]), strict=True
            ):
                linear = layers[adapter]
                weight = linear.weight
                if is_dtensor(weight):
                    continue
                source = None if weight.is_meta else 0
                sharded = distribute_tensor(weight.detach(), ep_mesh, [placement], src_data_rank=source)
                linear.weight = nn.Parameter(sharded, requires_grad=weight.requires_grad)

    def get_delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """PEFT's ``(lhs [E, R, r], rhs [E, r, C], scaling)``, in the experts' compute dtype (stock: the weight's);
        under expert parallelism of this rank's experts only (the local rows of the sharded factors)."""
        weight_a = _local(self.lora_A[adapter_name].weight)
        weight_b = _local(self.lora_B[adapter_name].weight)
        experts = weight_a.shape[0] // self.r[adapter_name]  # every expert, or this rank's under EP
        weight_a = weight_a.reshape(experts, -1, weight_a.shape[-1])
        weight_b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1)
        dtype = self._experts().compute_dtype
        return weight_b.to(dtype), weight_a.to(dtype), self.scaling[adapter_name]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Whole factors (PEFT's adapter file, a one-process state dict) loaded into factors split by expert: each
        rank keeps its experts' rows of them (no communication); DTensor values load as they are."""
        from torch.distributed.tensor import distribute_tensor

        for layer_name in ("lora_A", "lora_B"):
            for adapter, linear in getattr(self, layer_name).items():
                key, weight = f"{prefix}{layer_name}.{adapter}.weight", linear.weight
                value = state_dict.get(key)
                whole = isinstance(value, torch.Tensor) and not is_dtensor(value)
                # a value of another shape is left to the copy, which names the mismatch
                if is_dtensor(weight) and whole and tuple(value.shape) == tuple(weight.shape):
                    state_dict[key] = distribute_tensor(
                        value.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None
                    )
        super()._load_from_state_dict(state_dict, prefix, *args)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]) -> Iterator[None]:
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not adapters:
            yield
            return
        experts = self._experts()
        deltas = [ExpertDelta(*self.get_delta_factors(adapter)) for adapter in adapters]
        for delta in deltas:
            if delta.lhs.shape[0] != experts.num_experts:
                raise ExpertParallelError(
                    f"LoRA on {self.parameter_name}: this rank's factors cover {delta.lhs.shape[0]} experts but "
                    f"its experts module holds {experts.num_experts}: expert-parallel experts need their factors "
                    "split with them, which parallelize_experts does for PEFT applied before or after it"
                )
        with attached_deltas(experts, self.parameter_name, deltas):
            yield

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add each adapter's delta to the FP8 experts, re-quantizing the moved experts with fresh scales."""
        records: list[MergeRecord] = self.__dict__.setdefault(_RECORDS, [])
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            delta_of = self._delta_function(adapter)
            records.append(
                merge_expert_delta(
                    self._experts(),
                    self.parameter_name,
                    delta_of,
                    safe_merge=safe_merge,
                    key=self.parameter_name,
                )
            )
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Put the codes and scales the merges replaced back, bit for bit (latest first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        records: list[MergeRecord] = self.__dict__.get(_RECORDS, [])
        while self.merged_adapters:
            self.merged_adapters.pop()
            restore_merged(self._experts(), records.pop())

    def _delta_function(self, adapter: str) -> Any:
        """``e -> [R, C]``: PEFT's ``get_delta_weight`` for one expert (its einsum over the adapter's factors in the
        adapter's dtype, times the scaling), the factors gathered whole when FSDP2 shards them."""
        weight_a = _full(self.lora_A[adapter].weight).detach()
        weight_b = _full(self.lora_B[adapter].weight).detach()
        weight_a = weight_a.reshape(self.num_experts, -1, weight_a.shape[-1])  # [E, r, C]
        weight_b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts)  # [R, r, E]
        scaling = self.scaling[adapter]

        def delta_of(expert: int) -> torch.Tensor:
            pick = slice(expert, expert + 1)
            delta = torch.einsum("o r e, e r i -> e o i", weight_b[..., pick], weight_a[pick])
            return delta.mul_(scaling)[0]

        return delta_of


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor factor (differentiable: its gradient lands on the same rows), or the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


# PEFT tells its parameter wrappers from other tuner layers by class *name* (``tuners_utils``: a second targeted
# tensor of the same module nests a new wrapper only around a "ParamWrapper", and a second adapter reuses the one
# whose name is "ParamWrapper"), so the subclass answers to that name; ``__qualname__`` keeps its own.
Fp8ExpertsParamWrapper.__name__ = "ParamWrapper"
