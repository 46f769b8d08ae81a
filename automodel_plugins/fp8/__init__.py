"""FP8 both ways: the formats checkpoints use, decoding them into a model's dtype and encoding them back.

* ``formats``: the float8 dtypes and the names scales have beside a weight;
* ``scales``: scale dtypes (fp32, bf16, E8M0 bytes), grids, and the checks that refuse a poisoned scale;
* ``decode``: dequantize a weight, or one rank's region of it;
* ``stacked``: block FP8 of stacked matrices (fused MoE experts), one scale grid per matrix;
* ``encode``: quantize a float weight, per tensor or per block;
* ``amax``: the largest magnitude per tensor or per block of the part of a weight a rank holds, combined over ranks;
* ``scale_policy``: which scale a weight is saved with (its source scale while it fits, else a fresh one);
* ``quantization``: a config's ``quantization_config`` read into what a load needs (no torch);

Names are imported on first use (``automodel_plugins.fp8.dequantize``), so that ``quantization`` (which the
claim helpers use, and ``automodel-plugins list`` imports) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FP8_DTYPES": "formats",
    "WEIGHT_SCALE_SUFFIXES": "formats",
    "ACTIVATION_SCALE_SUFFIXES": "formats",
    "is_fp8": "formats",
    "scale_key_candidates": "formats",
    "activation_key_candidates": "formats",
    "E8M0_DTYPE": "scales",
    "SCALE_DTYPES": "scales",
    "decode_scale": "scales",
    "encode_scale": "scales",
    "grid_shape": "scales",
    "validate_scale": "scales",
    "dequantize": "decode",
    "quantize": "encode",
    "encode": "encode",
    "amax_scale": "encode",
    "tensor_amax": "amax",
    "block_amax": "amax",
    "all_reduce_max": "amax",
    "choose_scale": "scale_policy",
    "fit_limit": "scale_policy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'automodel_plugins.fp8' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"automodel_plugins.fp8.{module}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
