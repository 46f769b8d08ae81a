"""A config's ``quantization_config``: read into what a streaming FP8 load needs, or a typed refusal, and the
``claim_config`` answer of a plugin that serves "this model, FP8 or unquantized".

Imports neither torch nor transformers: ``automodel-plugins list`` runs the claim helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError
from automodel_plugins.registry.claims import Claim, Decline
from automodel_plugins.sources import compressed_tensors

if TYPE_CHECKING:
    import torch

__all__ = [
    "SUPPORTED_METHODS",
    "Fp8Quantization",
    "claim_fp8_or_unquantized",
    "describe_fp8",
    "parse_fp8_quantization",
    "quantization_dict",
]

SUPPORTED_METHODS = ("fp8", compressed_tensors.METHOD)


class Fp8Quantization(BaseModel):
    """The fields of an FP8 ``quantization_config`` (transformers' ``FineGrainedFP8Config`` spelling)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    quant_method: Literal["fp8"]
    activation_scheme: Literal["static", "dynamic"] = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = Field(default=())
    fmt: Literal["e4m3", "float8_e4m3fn"] = "e4m3"

    @field_validator("weight_block_size")
    @classmethod
    def _positive_blocks(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"block sizes must be positive, got {list(value)}")
        return value

    @field_validator("modules_to_not_convert", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return () if value is None else value

    def fp8_dtype(self) -> torch.dtype:
        """The torch dtype of the weights ``fmt`` declares (imports torch: not for the claim path)."""
        import torch

        return torch.float8_e4m3fn


def quantization_dict(config: Any, *, path: str | Path | None = None) -> dict[str, Any] | None:
    """The config's ``quantization_config`` as a plain dict, or None when it declares none; ``path`` (the
    ``config.json``) is named by the error for one that is not an object."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UnsupportedQuantizationError(
            path, f"quantization_config must be an object, got {type(raw).__name__}"
        )
    return raw


def parse_fp8_quantization(config: Any, *, path: str | Path | None = None) -> Fp8Quantization | None:
    """``None`` for an unquantized config; the parsed FP8 settings; or UnsupportedQuantizationError naming
    ``path`` (the ``config.json``, when known) and the field (``quantization_config.quant_method`` for
    e.g. ``awq``). A compressed-tensors FP8 dict is read through its translation
    (:func:`~automodel_plugins.sources.compressed_tensors.translate_compressed_tensors`), whose errors name the
    compressed-tensors field (``...weights.num_bits`` of an int4 scheme)."""
    raw = quantization_dict(config, path=path)
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise UnsupportedQuantizationError(
            path,
            f"quantization_config.quant_method {method!r} is not supported (supported: {', '.join(SUPPORTED_METHODS)})",
        )
    if method == compressed_tensors.METHOD:
        raw = compressed_tensors.translate_compressed_tensors(raw, path=path)
    try:
        return Fp8Quantization.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"quantization_config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
        )
        raise UnsupportedQuantizationError(path, problems) from error


# --- the claim of an FP8-or-unquantized plugin -----------------------------------------------------------


def describe_fp8(quantization: Mapping[str, Any]) -> str:
    """``"128x128 block FP8 weights"``, ``"per-tensor FP8 weights"`` or ``"per-channel FP8 weights"``, for a
    claim's reason.

    Lenient on purpose: a malformed ``weight_block_size`` is shown as written and refused later by the
    adapter (``fp8_adapter_for``), whose error names the field.
    """
    block = quantization.get("weight_block_size")
    if not block:
        return "per-tensor FP8 weights"
    if isinstance(block, (list, tuple)) and tuple(block) == compressed_tensors.PER_CHANNEL_BLOCK:
        return "per-channel FP8 weights"
    shown = "x".join(map(str, block)) if isinstance(block, (list, tuple)) else repr(block)
    return f"{shown} block FP8 weights"


def claim_fp8_or_unquantized(config: Any, model: str, *, priority: int = 0) -> Claim | Decline:
    """The claim for a config already known to be ``model``: unquantized, ``quant_method: fp8``, or
    compressed-tensors FP8 the host reads (llm-compressor's FP8_BLOCK, FP8_DYNAMIC's per-channel weights,
    per-tensor FP8).

    Any other method (``awq``, ``gptq``, ...) and compressed-tensors schemes the host does not apply (int4,
    int8, NVFP4, per-group scales, activations only, ...) are not ours: a :class:`Decline` naming the method or
    the compressed-tensors field, so another plugin or stock transformers (whose compressed-tensors
    integration applies them) may serve it and ``list --config`` says why this one did not. An ``fp8`` config
    the host cannot read (``fmt: e5m2``, a zero block) is still claimed, so that the load fails naming the
    field instead of falling back to another loader.
    """
    quantization = quantization_dict(config)
    if quantization is None:
        return Claim(reason=f"{model}, unquantized", priority=priority)
    method = quantization.get("quant_method")
    if method == compressed_tensors.METHOD:
        try:
            translated = compressed_tensors.translate_compressed_tensors(quantization, path=None)
        except ConfigError as error:
            return Decline(reason=f"{model} with quant_method {method!r} the host does not apply: {error}")
        return Claim(reason=f"{model}, compressed-tensors {describe_fp8(translated)}", priority=priority)
    if method != "fp8":
        return Decline(reason=f"{model} with quant_method {method!r}: only FP8 or unquantized is served")
    return Claim(reason=f"{model}, {describe_fp8(quantization)}", priority=priority)
