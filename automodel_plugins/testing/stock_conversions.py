"""Stock transformers' own per-expert conversion, registered for a model type that lacks it, so that a test or a
benchmark can compare against stock reading the per-expert FP8 form.

transformers 5.x merges per-expert checkpoint tensors into fused experts for qwen2_moe (``MergeModulelist`` +
``Concatenate``) but its qwen3_vl_moe mapping only transposes fused tensors: per-expert experts stay at their
random init, with a load report and no error. Registering the qwen2_moe rules first gives stock a reading of
that form (its FP8 quantizer dequantizes each expert tensor before the merge) to compare with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["stock_per_expert_conversion"]


@contextlib.contextmanager
def stock_per_expert_conversion(model_type: str = "qwen3_vl_moe") -> Iterator[None]:
    """transformers' qwen2_moe rules (merge the per-expert tensors, concatenate gate and up) registered ahead of
    ``model_type``'s own mapping for the duration, the original restored afterwards."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    original = get_checkpoint_conversion_mapping(model_type)
    per_expert = [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]
    register_checkpoint_conversion_mapping(model_type, per_expert + (original or []), overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, original or [], overwrite=True)
