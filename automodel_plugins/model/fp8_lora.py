"""PEFT LoRA over FP8-resident layers: training works with PEFT's stock ``lora.Linear``; merging needs this.

:class:`~automodel_plugins.model.fp8_linear.Fp8Linear` is an ``nn.Linear`` subclass, so ``get_peft_model`` wraps
it with PEFT's ``lora.Linear`` (forward, training, ``save_pretrained``, ``PeftModel.from_pretrained`` all
work; ``compute_dtype`` gives the adapters the compute dtype). PEFT's merge adds the LoRA delta to
``base_layer.weight`` in place, which for FP8 codes is either an error or (``safe_merge=True``) the delta cast
to ``uint8`` and added to the codes. So every such layer is an :class:`Fp8LoraLinear` (the
:mod:`~automodel_plugins.model.fp8_peft_hook` turns PEFT's ``lora.Linear`` over an ``Fp8Linear`` into one, with
nothing registered; :func:`register_fp8_lora` does it through PEFT's custom-module API), whose merge goes into a
stock ``nn.Linear`` holding the dequantized weight in the compute dtype plus the delta (re-quantizing there
would lose most of a small delta). PEFT's own ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload``
then work, and ``unmerge`` restores the FP8 base exactly. Every merge and unmerge tells the model's quantization
record (:meth:`~automodel_plugins.model.fp8_resident.Fp8Resident.mark_fp8`), so ``config.quantization_config``
always says what the model holds, and a stock ``save_pretrained`` after any of them writes a checkpoint
transformers reads as it is. :func:`merge_lora` is ``merge_and_unload`` that also merges FSDP2-sharded layers.

Importing this module imports PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.sharded_merge import merge_sharded_lora_layers

__all__ = ["Fp8LoraLinear", "adopt_fp8_base", "dequantize_lora_bases", "merge_lora", "register_fp8_lora"]

_FP8_BASE = "_fp8_base"


class Fp8LoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` over an :class:`Fp8Linear`: the same forward and training; ``merge`` first
    gives the layer a stock ``nn.Linear`` base holding the dequantized weight (compute dtype) and merges
    there; ``unmerge`` puts the original FP8 base back, bit for bit."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.lora_variant:
            raise NotImplementedError(
                "Fp8LoraLinear merges plain LoRA only; DoRA and other variants over FP8 bases are not supported"
            )
        base = self.get_base_layer()
        if isinstance(base, Fp8Linear):
            object.__setattr__(self, _FP8_BASE, base)  # not a submodule: no state_dict keys, no double merge
            self.base_layer = base.to_linear()
            base.mark_fp8(False)  # the config lists the layer in modules_to_not_convert
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        fp8_base = self.__dict__.get(_FP8_BASE)
        if fp8_base is None:
            super().unmerge()
            return
        if not self.merged:
            return
        self.base_layer = fp8_base
        object.__delattr__(self, _FP8_BASE)
        fp8_base.mark_fp8(True)
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", "lora.Fp8LoraLinear", 1)


def adopt_fp8_base(layer: nn.Module) -> None:
    """Make ``layer``, when it is exactly PEFT's ``lora.Linear``, an :class:`Fp8LoraLinear` (a subclass with no
    state of its own). Called by :mod:`~automodel_plugins.model.fp8_peft_hook` when PEFT gives a LoRA layer an
    :class:`Fp8Linear` base, so that PEFT's own merge works without :func:`register_fp8_lora`."""
    if type(layer) is LoraLinear:
        layer.__class__ = Fp8LoraLinear


def register_fp8_lora(config: Any) -> Any:
    """``config`` (a ``peft.LoraConfig``) with LoRA on :class:`Fp8Linear` done by :class:`Fp8LoraLinear`.

    PEFT does not save the registration with the adapter: register again on the config given to
    ``PeftModel.from_pretrained(model, path, config=register_fp8_lora(LoraConfig.from_pretrained(path)))``.
    """
    config._register_custom_module({Fp8Linear: Fp8LoraLinear})
    return config


def dequantize_lora_bases(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Give every LoRA layer over an :class:`Fp8Linear` a stock ``nn.Linear`` base with the dequantized weight
    (``dtype``, default its compute dtype), one layer at a time; PEFT's stock merge then works. Returns how
    many bases were replaced."""
    count = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, BaseTunerLayer) and isinstance(base, Fp8Linear):
            module.base_layer = base.to_linear(dtype)
            base.mark_fp8(False)
            count += 1
    return count


def merge_lora(peft_model: nn.Module, **merge_kwargs: Any) -> nn.Module:
    """``peft_model.merge_and_unload(**merge_kwargs)`` for a model whose LoRA layers sit on FP8-resident bases.

    Merged layers become stock ``nn.Linear`` in the compute dtype (dequantized weight + LoRA delta); FP8
    layers without an adapter stay FP8. LoRA on ``Fp8Experts`` (``target_parameters``) merges into the experts'
    FP8 codes, the moved experts re-quantized with fresh scales
    (:mod:`~automodel_plugins.model.fp8_experts_merge`): the experts stay FP8. The returned stock model's ``quantization_config`` lists the merged
    layers in ``modules_to_not_convert`` (or is dropped when no FP8 layer is left), as after PEFT's own
    ``merge_and_unload``, so a stock ``save_pretrained`` writes a checkpoint transformers loads as it is.

    Under FSDP2 (base weights sharded by rows) every rank calls this together and merges its own rows
    (:func:`~automodel_plugins.model.sharded_merge.merge_sharded_lora_layers`): the merged weights are
    ``DTensor`` shards equal to a one-process merge's rows, for ``automodel_plugins.save_pretrained`` from
    every rank. The FSDP2 units still refer to the replaced layers, so save the merged model (and load the
    save) rather than run it.
    """
    merge_sharded_lora_layers(
        peft_model,
        safe_merge=bool(merge_kwargs.get("safe_merge", False)),
        adapter_names=merge_kwargs.get("adapter_names"),
    )
    dequantize_lora_bases(peft_model)
    return peft_model.merge_and_unload(**merge_kwargs)
