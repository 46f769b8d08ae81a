"""Hook bodies that FP8 vision-language plugins share, so that each plugin only names its model.

* :func:`claim_fp8_or_unquantized`: the ``claim_config`` answer for "this model type, FP8 or unquantized";
* :func:`text_vocab_size` and :func:`vlm_fused_loss_forward`: the fused-loss forward of a VLM whose
  vocabulary lives on ``config.text_config``.

Importing this module imports neither torch nor transformers (``automodel-plugins list`` imports plugins).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automodel_plugins.claim import Claim
from automodel_plugins.errors import UnsupportedQuantizationError
from automodel_plugins.quantization import Fp8Quantization, parse_fp8_quantization

__all__ = ["claim_fp8_or_unquantized", "describe_fp8", "text_vocab_size", "vlm_fused_loss_forward"]


def describe_fp8(quantization: Fp8Quantization) -> str:
    """``"128x128 block FP8 weights, dynamic activations"`` or ``"per-tensor FP8 weights, ..."``."""
    block = quantization.weight_block_size
    granularity = f"{block[0]}x{block[1]} block" if block else "per-tensor"
    return f"{granularity} FP8 weights, {quantization.activation_scheme} activations"


def claim_fp8_or_unquantized(config: Any, model: str, *, priority: int = 0) -> Claim | None:
    """Claim ``config`` (already known to be ``model``) when it is unquantized or FP8 the host can load.

    Any other ``quant_method`` (``awq``, ``gptq``, ...) and an FP8 config the host cannot read (an unknown
    ``fmt``, a non-positive block) are not ours: ``None``, so another plugin or stock transformers may serve it.
    """
    try:
        quantization = parse_fp8_quantization(config)
    except UnsupportedQuantizationError:
        return None
    detail = "unquantized" if quantization is None else describe_fp8(quantization)
    return Claim(reason=f"{model}, {detail}", priority=priority)


def text_vocab_size(config: Any) -> int:
    """The output vocabulary: on ``config.text_config`` for a VLM, on the config itself otherwise."""
    return getattr(config, "text_config", config).vocab_size


def vlm_fused_loss_forward(model: Any) -> Callable[..., Any]:
    """The host's fused-loss forward over ``model``'s stock class, vocabulary read from ``text_config``."""
    from automodel_plugins.forward import fused_loss_forward

    return fused_loss_forward(type(model).forward, vocab_size=text_vocab_size)
