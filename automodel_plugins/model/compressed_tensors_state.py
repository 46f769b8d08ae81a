"""FP8-resident layers of a compressed-tensors (llm-compressor) checkpoint show their scales in ``state_dict()``
as compressed-tensors names and shapes them, so that every reader of the state dict sees the format the
model's ``config.quantization_config`` declares.

An :class:`~automodel_plugins.model.fp8_linear.Fp8Linear` holds its scale as ``weight_scale_inv`` (0-d per
tensor) and a static input scale as ``activation_scale`` (0-d): transformers' FP8 names. Under a
compressed-tensors config, transformers + the ``compressed-tensors`` package build each quantized ``Linear``
with ``weight_scale`` (``[1]`` per tensor, ``[out, 1]`` per channel, the block grid) and ``input_scale``
(``[1]``), and load nothing else. So the loader has such layers show ``weight_scale`` / ``input_scale`` in those
shapes (views of the fp32 buffers: an in-place load into a ``state_dict()`` reaches the module), and take either
name in ``load_state_dict`` (:meth:`~automodel_plugins.model.fp8_resident.Fp8Resident.show_scales_as`). A stock
``save_pretrained`` then writes the checkpoint transformers + compressed-tensors loads with every scale, and
DCP, FSDP2 and PEFT see one naming. The buffers, the forward and this host's own save are unchanged.

FP8-resident fused experts (:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`) get no such names:
compressed-tensors quantizes ``Linear`` modules, and transformers 5.25 + compressed-tensors 0.20 loads no fused
experts from compressed-tensors (the experts of the source checkpoint itself come back MISSING), so no naming of
them would load; a stock save of a model holding them stays refused
(:mod:`~automodel_plugins.model.stock_save_guard`).
"""

from __future__ import annotations

from torch import nn

from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_linear import ACTIVATION_NAME, SCALE_NAME, Fp8Linear, fp8_linear_modules
from automodel_plugins.sources import compressed_tensors

__all__ = [
    "INPUT_SCALE",
    "WEIGHT_SCALE",
    "compressed_tensors_scales",
    "declares_compressed_tensors",
    "show_compressed_tensors_names",
]

WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"


def declares_compressed_tensors(model: nn.Module) -> bool:
    """``model.config`` declares a compressed-tensors ``quantization_config``."""
    config = getattr(model, "config", None)
    declared = quantization_dict(config) if config is not None else None
    return declared is not None and declared.get("quant_method") == compressed_tensors.METHOD


def compressed_tensors_scales(layer: Fp8Linear) -> tuple[tuple[str, str, tuple[int, ...] | None], ...]:
    """``(buffer, key, shape)`` of ``layer``'s scales as compressed-tensors stores them: ``weight_scale`` ``[1]``
    per tensor (the grid as held per channel or block), ``input_scale`` ``[1]``."""
    return (
        (SCALE_NAME, WEIGHT_SCALE, (1,) if layer.block_size is None else None),
        (ACTIVATION_NAME, INPUT_SCALE, (1,)),
    )


def show_compressed_tensors_names(model: nn.Module) -> list[str]:
    """Have every :class:`Fp8Linear` of ``model`` show compressed-tensors' scale names and shapes when its config
    declares compressed-tensors; the names of the layers it did (none otherwise)."""
    if not declares_compressed_tensors(model):
        return []
    layers = fp8_linear_modules(model)
    for layer in layers.values():
        layer.show_scales_as(compressed_tensors_scales(layer))
    return list(layers)
