"""Refuse a stock ``save_pretrained`` whose checkpoint would say one format and hold another.

An FP8-resident model (``dequantize=False``) loaded from compressed-tensors (llm-compressor) keeps
``config.quantization_config`` the compressed-tensors dict (its ``ignore`` kept truthful by
:mod:`~automodel_plugins.model.quantization_record`). Its ``Fp8Linear`` layers show compressed-tensors' own
``weight_scale`` / ``input_scale`` in ``state_dict()`` (:mod:`~automodel_plugins.model.compressed_tensors_state`),
so a stock save of them is the format the config declares. FP8-resident fused experts (``Fp8Experts``) have no
such form: compressed-tensors quantizes ``Linear`` modules, and transformers 5.25 + compressed-tensors 0.20 loads
no fused experts from a compressed-tensors checkpoint (those of the source itself come back MISSING, left as
``torch.empty``'s memory). A stock save of a model holding them (written as transformers' FP8
``gate_up_proj_scale_inv`` under the compressed-tensors config) would load silently wrong. So the host sets a
:class:`GuardedSave` as ``save_pretrained`` on such an instance (class untouched, like a ``forward_override``):
while the model holds an FP8-resident module that does not show compressed-tensors names under a
compressed-tensors config it raises :class:`~automodel_plugins.errors.StockSaveRefusedError` before writing
anything, naming ``automodel_plugins.save_pretrained`` (which writes the source's own format); otherwise it is
transformers' own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from automodel_plugins.errors import StockSaveRefusedError
from automodel_plugins.model.compressed_tensors_state import declares_compressed_tensors
from automodel_plugins.model.fp8_resident import Fp8Resident, modules_of_type

__all__ = ["GuardedSave", "guard_stock_save", "mislabeled_modules", "mislabels_stock_save"]


def mislabeled_modules(model: nn.Module) -> list[str]:
    """The FP8-resident modules of ``model`` a stock save would write under names its compressed-tensors config
    does not declare (those showing no compressed-tensors names: fused experts); none without that config."""
    if not declares_compressed_tensors(model):
        return []
    return [name for name, module in modules_of_type(model, Fp8Resident).items() if not module.shown_as]


def mislabels_stock_save(model: nn.Module) -> bool:
    """A stock save of ``model`` would write FP8-resident tensors its compressed-tensors config misnames."""
    return bool(mislabeled_modules(model))


class GuardedSave:
    """transformers' ``save_pretrained`` of ``model``, refused while it would write a mislabeled checkpoint. An
    object, not a bound function, so that ``copy.deepcopy`` and ``torch.save`` of the model keep the guard."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        # with adapters added in transformers (add_adapter / load_adapter) it saves the adapters alone
        adapters_only = getattr(self.model, "_hf_peft_config_loaded", False)
        mislabeled = [] if adapters_only else mislabeled_modules(self.model)
        if mislabeled:
            shown = ", ".join(mislabeled[:3]) + (
                f", ... ({len(mislabeled)} in all)" if len(mislabeled) > 3 else ""
            )
            raise StockSaveRefusedError(
                "a stock save_pretrained of this FP8-resident model (dequantize=False) loaded from a "
                f"compressed-tensors checkpoint would write its FP8-resident fused experts ({shown}) as "
                "transformers' FP8 tensors (gate_up_proj_scale_inv) under the compressed-tensors "
                "quantization_config, and transformers + compressed-tensors loads no fused experts from "
                "compressed-tensors (every scale MISSING: uninitialized memory). Save it with "
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
