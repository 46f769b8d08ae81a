"""State-dict adapters: pure mappings between a model's tensor names and one checkpoint's keys.

* ``base``: the contract, :class:`StateDictAdapter` (``from_hf`` / ``to_hf``) and :class:`TensorSource`;
* ``fp8``: :class:`Fp8StateDictAdapter`, prefix renames plus FP8 scales, and :func:`fp8_adapter_for`, the
  adapter a config's ``quantization_config`` asks for (also the host's default when a plugin names none).
"""

from __future__ import annotations

from automodel_plugins.adapters.base import StateDictAdapter, TensorSource
from automodel_plugins.adapters.fp8 import Fp8StateDictAdapter, PrefixRename, PrefixRenames, fp8_adapter_for

__all__ = [
    "Fp8StateDictAdapter",
    "PrefixRename",
    "PrefixRenames",
    "StateDictAdapter",
    "TensorSource",
    "fp8_adapter_for",
]
