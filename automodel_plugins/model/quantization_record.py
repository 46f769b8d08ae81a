"""Keep ``model.config.quantization_config`` saying what an FP8-resident model holds while its FP8 modules are
merged away and put back, whoever does it.

A stock ``save_pretrained`` writes the config as it is, and transformers' FP8 loader makes an ``FP8Linear`` of
every linear layer ``quantization_config`` does not exclude (on a GPU; on CPU it dequantizes). A merged LoRA
layer (a stock ``nn.Linear``: dequantized weight plus delta, no scale) must therefore be listed in
``modules_to_not_convert``, and once put back FP8 (``unmerge_adapter``) must not be; with no FP8 module left the
quantization must go. PEFT's merge and unmerge (``merge_and_unload``, ``merge_adapter`` then ``unload``,
``safe_merge``, ``unmerge_adapter``) reach only the LoRA layer, never the model or its config. So the loader,
which knows each module's name, gives every FP8-resident module (``Fp8Linear``, ``Fp8Experts``) that name and the
model's :class:`QuantizationRecord` (:func:`track_quantization`); every path that replaces such a module with a
dequantized stock one or puts it back (``Fp8LoraLinear.merge`` / ``unmerge``, ``dequantize_lora_bases``, the
sharded merge) calls :meth:`~automodel_plugins.model.fp8_resident.Fp8Resident.mark_fp8`, and the record rewrites
the config from what it was loaded under: one rule for every path, and an unmerge gives the loaded config back.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.sources import compressed_tensors

__all__ = ["QuantizationRecord", "track_quantization"]


class QuantizationRecord:
    """The ``quantization_config`` a model was loaded under, its FP8-resident modules (``resident``, module
    order) and which of them the model no longer holds in FP8 (:attr:`dequantized`).

    ``dequantized_at_load``: modules whose checkpoint FP8 weights the load dequantized although the rest stay
    FP8 (experts off the block boundaries, a weight assembled from several tensors), listed from the start.
    ``default_not_converted``: what transformers keeps unquantized when the declared config lists no
    ``modules_to_not_convert`` (a written list replaces its defaults, so they are written out with it)."""

    def __init__(
        self,
        config: Any,
        declared: Mapping[str, Any],
        resident: Sequence[str],
        *,
        dequantized_at_load: Sequence[str] = (),
        default_not_converted: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.declared = copy.deepcopy(dict(declared))
        self.resident = tuple(resident)
        self.dequantized_at_load = tuple(dequantized_at_load)
        self.default_not_converted = tuple(default_not_converted)
        self.dequantized: set[str] = set()

    def mark(self, name: str, fp8: bool) -> None:
        """Module ``name`` is held in FP8 again (``fp8``) or replaced by a dequantized stock module; rewrite."""
        if fp8:
            self.dequantized.discard(name)
        else:
            self.dequantized.add(name)
        self.write()

    def write(self) -> None:
        """Set ``config.quantization_config``: the declared one, with the modules dequantized at load and the
        dequantized resident ones (module order) appended to ``modules_to_not_convert`` (compressed-tensors:
        its ``ignore``) unless an entry already covers them; no quantization at all when no resident module is
        left FP8."""
        if self.dequantized.issuperset(self.resident):
            if quantization_dict(self.config) is not None:
                del self.config.quantization_config
            return
        quantization = copy.deepcopy(self.declared)
        merged = [name for name in self.resident if name in self.dequantized]
        field = _not_converted_field(quantization)
        listed = quantization.get(field)
        kept = list(self.default_not_converted) if listed is None else list(listed)
        added = [name for name in (*self.dequantized_at_load, *merged) if not _covered(name, kept)]
        if added:
            quantization[field] = kept + added
        self.config.quantization_config = quantization

    def __repr__(self) -> str:
        return f"QuantizationRecord({len(self.resident)} FP8-resident modules, {len(self.dequantized)} dequantized)"


def _not_converted_field(quantization: Mapping[str, Any]) -> str:
    """Where the declared config lists unquantized modules: compressed-tensors' ``ignore``, else transformers'
    ``modules_to_not_convert`` (a compressed-tensors dict has no such field: a reader refuses it)."""
    return (
        "ignore"
        if quantization.get("quant_method") == compressed_tensors.METHOD
        else "modules_to_not_convert"
    )


def _covered(name: str, entries: Sequence[str]) -> bool:
    """``name`` is an entry or inside one; compressed-tensors' ``re:`` entries match it from its start."""
    return any(
        re.match(entry[3:], name)
        if entry.startswith("re:")
        else name == entry or name.startswith(entry + ".")
        for entry in entries
    )


def track_quantization(
    model: nn.Module, names: Sequence[str], *, dequantized_at_load: Sequence[str] = ()
) -> QuantizationRecord | None:
    """Give each FP8-resident module ``names`` of ``model`` (module order) its name and a record of
    ``model.config``'s quantization, shared by all, and write the config when ``dequantized_at_load`` (module
    order) lists any module; None (nothing given) when the config declares no quantization."""
    config = getattr(model, "config", None)
    declared = quantization_dict(config) if config is not None else None
    if declared is None:
        return None
    defaults: Sequence[str] = ()
    if (
        _not_converted_field(declared) == "modules_to_not_convert"
        and declared.get("modules_to_not_convert") is None
        and hasattr(model, "all_tied_weights_keys")
    ):
        from transformers.quantizers.base import get_keys_to_not_convert

        defaults = sorted(get_keys_to_not_convert(model))
    record = QuantizationRecord(
        config, declared, names, dequantized_at_load=dequantized_at_load, default_not_converted=defaults
    )
    for name in names:
        module = model.get_submodule(name)
        module.quantization_record, module.module_name = record, name
    if dequantized_at_load:
        record.write()
    return record
