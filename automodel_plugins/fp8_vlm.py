"""Hook bodies that FP8 vision-language plugins share, so that each plugin only names its model.

* :func:`claim_fp8_or_unquantized`: the ``claim_config`` answer for "this model type, FP8 or unquantized";
* :func:`text_vocab_size` and :func:`vlm_fused_loss_forward`: the fused-loss forward of a VLM whose
  vocabulary lives on ``config.text_config``.

Importing this module imports neither torch nor transformers (``automodel-plugins list`` imports plugins).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from automodel_plugins.claim import Claim, Decline
from automodel_plugins.quantization import quantization_dict

__all__ = ["claim_fp8_or_unquantized", "describe_fp8", "text_vocab_size", "vlm_fused_loss_forward"]


def describe_fp8(quantization: Mapping[str, Any]) -> str:
    """``"128x128 block FP8 weights"`` or ``"per-tensor FP8 weights"``, for a claim's reason.

    Lenient on purpose: a malformed ``weight_block_size`` is shown as written and refused later by the
    adapter (``fp8_adapter_for``), whose error names the field.
    """
    block = quantization.get("weight_block_size")
    if not block:
        return "per-tensor FP8 weights"
    shown = "x".join(map(str, block)) if isinstance(block, (list, tuple)) else repr(block)
    return f"{shown} block FP8 weights"


def claim_fp8_or_unquantized(config: Any, model: str, *, priority: int = 0) -> Claim | Decline:
    """The claim for a config already known to be ``model``: unquantized or ``quant_method: fp8``.

    Any other method (``awq``, ``gptq``, ``compressed-tensors``, ...) is not ours: a :class:`Decline` naming
    the method, so another plugin or stock transformers may serve it and ``list --config`` says why this one
    did not. An FP8 config the host cannot read (``fmt: e5m2``, a zero block) is still claimed, so that the
    load fails naming the field instead of falling back to another loader.
    """
    quantization = quantization_dict(config)
    if quantization is None:
        return Claim(reason=f"{model}, unquantized", priority=priority)
    method = quantization.get("quant_method")
    if method != "fp8":
        return Decline(reason=f"{model} with quant_method {method!r}: only FP8 or unquantized is served")
    return Claim(reason=f"{model}, {describe_fp8(quantization)}", priority=priority)


def text_vocab_size(config: Any) -> int:
    """The output vocabulary: on ``config.text_config`` for a VLM, on the config itself otherwise."""
    return getattr(config, "text_config", config).vocab_size


def vlm_fused_loss_forward(model: Any) -> Callable[..., Any]:
    """The host's fused-loss forward over ``model``'s stock class, vocabulary read from ``text_config``."""
    from automodel_plugins.forward import fused_loss_forward

    return fused_loss_forward(type(model).forward, vocab_size=text_vocab_size)
