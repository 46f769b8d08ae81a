"""Refuse a stock ``save_pretrained`` whose checkpoint would say one format and hold another.

An FP8-resident model (``dequantize=False``) loaded from compressed-tensors (llm-compressor) holds its FP8
layers as ``Fp8Linear`` / ``Fp8Experts``, whose ``state_dict()`` keys are transformers' FP8 names
(``weight_scale_inv``, ``activation_scale``, fused experts' ``gate_up_proj_scale_inv``), while
``config.quantization_config`` stays the compressed-tensors dict (its ``ignore`` kept truthful by
:mod:`~automodel_plugins.model.quantization_record`). A stock ``save_pretrained`` writes both as they are, and
transformers 5.25 with the ``compressed-tensors`` package loads that checkpoint with every ``weight_scale`` and
``input_scale`` reported MISSING and left as ``torch.empty``'s memory: silently wrong weights (without the package
it raises ImportError). So the host sets a :class:`GuardedSave` as ``save_pretrained`` on such an instance (class
untouched, like a ``forward_override``): while the model still holds an FP8-resident module under a compressed-tensors
config it raises :class:`~automodel_plugins.errors.StockSaveRefusedError` before writing anything, naming
``automodel_plugins.save_pretrained`` (which writes the source's own format); once every resident module is merged
away (the config then declares no quantization) it is transformers' own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from automodel_plugins.errors import StockSaveRefusedError
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_resident import Fp8Resident, modules_of_type
from automodel_plugins.sources import compressed_tensors

__all__ = ["GuardedSave", "guard_stock_save", "mislabels_stock_save"]


def mislabels_stock_save(model: nn.Module) -> bool:
    """A stock save of ``model`` would write FP8-resident tensors under a compressed-tensors config."""
    config = getattr(model, "config", None)
    declared = quantization_dict(config) if config is not None else None
    return (
        declared is not None
        and declared.get("quant_method") == compressed_tensors.METHOD
        and bool(modules_of_type(model, Fp8Resident))
    )


class GuardedSave:
    """transformers' ``save_pretrained`` of ``model``, refused while it would write a mislabeled checkpoint. An
    object, not a bound function, so that ``copy.deepcopy`` and ``torch.save`` of the model keep the guard."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        # with adapters added in transformers (add_adapter / load_adapter) it saves the adapters alone
        adapters_only = getattr(self.model, "_hf_peft_config_loaded", False)
        if not adapters_only and mislabels_stock_save(self.model):
            raise StockSaveRefusedError(
                "a stock save_pretrained of this FP8-resident model (dequantize=False) loaded from a "
                "compressed-tensors checkpoint would write transformers' FP8 tensor names (weight_scale_inv, "
                "activation_scale) under the compressed-tensors quantization_config, which transformers loads "
                "with every weight_scale MISSING (uninitialized memory). Save it with "
                "automodel_plugins.save_pretrained(model, dest) (the compressed-tensors format it was loaded "
                "from; quantization='fp8-block' / 'fp8-tensor' / 'none' for another), or load it with "
                "dequantize=True",
                path=save_directory,
            )
        return type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)


def guard_stock_save(model: nn.Module) -> bool:
    """Set a :class:`GuardedSave` as ``model.save_pretrained`` when a stock save would mislabel it; whether it
    did."""
    if not mislabels_stock_save(model):
        return False
    model.save_pretrained = GuardedSave(model)
    return True
