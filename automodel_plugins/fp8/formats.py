"""FP8 weight formats as checkpoints store them: the float8 dtypes, and how scales are named beside a weight.

Every spelling in the wild is accepted on read: DeepSeek/Mistral/Qwen ``weight_scale_inv``, compressed-tensors
``weight_scale`` and Mistral-native ``qscale_weight`` are all **multiplied** into the weight; static activation
scales are ``activation_scale``, ``input_scale`` or ``qscale_act``.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter, methodcaller

import torch

__all__ = [
    "ACTIVATION_SCALE_SUFFIXES",
    "FP8_DTYPES",
    "WEIGHT_SCALE_SUFFIXES",
    "activation_key_candidates",
    "is_fp8",
    "scale_key_candidates",
    "suffixes_in",
    "weight_key_of_scale",
]

FP8_DTYPES: frozenset[torch.dtype] = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# All of these are MULTIPLIED into the fp8 weight: the "inv" is a misnomer kept by DeepSeek/Mistral/Qwen.
WEIGHT_SCALE_SUFFIXES: tuple[str, ...] = ("weight_scale_inv", "weight_scale", "qscale_weight")
# Static input-activation scales: meaningless once weights are bf16, so loaders drop them.
ACTIVATION_SCALE_SUFFIXES: tuple[str, ...] = ("activation_scale", "input_scale", "qscale_act")


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the float8 weight dtypes (E8M0 is a scale format, not a weight format)."""
    return dtype in FP8_DTYPES


def _sibling_keys(weight_key: str, suffixes: tuple[str, ...]) -> list[str]:
    """``a.b.weight`` -> ``a.b.<suffix>``; a bare parameter (``experts.gate_up_proj``) -> ``<key>_<suffix>``
    for the suffixes that keep their meaning there (transformers' MoE convention: ``gate_up_proj_scale_inv``)."""
    if weight_key == "weight" or weight_key.endswith(".weight"):
        base = weight_key[: -len("weight")]
        return [base + suffix for suffix in suffixes]
    return [
        f"{weight_key}_{suffix.removeprefix('weight_')}" for suffix in suffixes if not suffix.startswith("q")
    ]


def scale_key_candidates(weight_key: str, suffixes: tuple[str, ...] = WEIGHT_SCALE_SUFFIXES) -> list[str]:
    """Names a weight's scale may have on disk, most common first (``suffixes``: those of them to name)."""
    return _sibling_keys(weight_key, suffixes)


def activation_key_candidates(
    weight_key: str, suffixes: tuple[str, ...] = ACTIVATION_SCALE_SUFFIXES
) -> list[str]:
    """Names a weight's static activation scale may have on disk (to be dropped)."""
    return _sibling_keys(weight_key, suffixes)


def suffixes_in(keys: Iterable[str], suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``suffixes`` (weight- or activation-scale ones) under which some key of ``keys`` may be a sibling
    (its last dotted segment ends with the suffix, less its ``weight_``): a name made with any other suffix is
    not among ``keys``, so a caller naming thousands of weights' siblings need not look those up."""
    ends = set(map(itemgetter(2), map(methodcaller("rpartition", "."), keys)))
    return tuple(s for s in suffixes if any(end.endswith(s.removeprefix("weight_")) for end in ends))


def weight_key_of_scale(key: str) -> str | None:
    """The weight a weight-scale key belongs to (the inverse of :func:`scale_key_candidates`), else None."""
    for suffix in WEIGHT_SCALE_SUFFIXES:
        if key == suffix or key.endswith("." + suffix):
            return key[: -len(suffix)] + "weight"
    for suffix in WEIGHT_SCALE_SUFFIXES:
        bare = "_" + suffix.removeprefix("weight_")
        if not suffix.startswith("q") and key.endswith(bare) and len(key) > len(bare):
            return key[: -len(bare)]
    return None
