"""Make PEFT's stock LoRA over an :class:`~automodel_plugins.model.fp8_linear.Fp8Linear` the FP8-aware
:class:`~automodel_plugins.model.fp8_lora.Fp8LoraLinear`, so that PEFT's own ``merge_and_unload`` /
``merge_adapter`` / ``unmerge_adapter`` work without any registration by the user.

PEFT picks the LoRA class from a fixed list of dispatchers; its only extension point, ``LoraConfig.
_register_custom_module`` (what :func:`~automodel_plugins.register_fp8_lora` calls), lives on the user's config,
which the model never sees. Its stock ``lora.Linear`` merges with ``base_layer.weight.data += delta``: on FP8
codes a raw dtype error, and with ``safe_merge=True`` the delta cast to ``uint8`` and added to the codes.
So a process-wide module-registration hook (installed by the first load that makes a model FP8-resident:
``from_pretrained`` / ``build_model`` with ``dequantize=False``; or by calling :func:`install`) watches for one
event:
a ``peft`` LoRA layer whose ``base_layer`` is set to an ``Fp8Linear`` (in ``LoraLayer.__init__``). That layer,
when it is exactly PEFT's ``lora.Linear``, becomes an ``Fp8LoraLinear``: a subclass adding no state, only
``merge`` (into a stock ``nn.Linear`` holding the dequantized weight plus the delta) and ``unmerge`` (the FP8
base back, bit for bit). A ``ParamWrapper`` (``target_parameters``) whose base is an
:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`, or another such wrapper around one (PEFT nests them, one
per targeted tensor), becomes an :class:`~automodel_plugins.model.fp8_experts_lora.Fp8ExpertsParamWrapper`, which
adds the LoRA delta to the dequantized experts instead of parametrizing the codes. Every other registration
returns at the first comparisons.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear

__all__ = ["install"]

_HANDLE: RemovableHandle | None = None


def install() -> None:
    """Register the hook, once per process."""
    global _HANDLE
    if _HANDLE is None:
        _HANDLE = register_module_module_registration_hook(_adopt_lora_over_fp8)


def _adopt_lora_over_fp8(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    if name != "base_layer" or not type(module).__module__.startswith("peft."):
        return
    if isinstance(submodule, Fp8Linear):
        from automodel_plugins.model.fp8_lora import (
            adopt_fp8_base,
        )  # imports peft: already imported by the caller

        adopt_fp8_base(module)
    elif isinstance(submodule, Fp8Experts) or type(submodule).__qualname__ == "Fp8ExpertsParamWrapper":
        from automodel_plugins.model.fp8_experts_lora import adopt_experts_wrapper

        adopt_experts_wrapper(module)
