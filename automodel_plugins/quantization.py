"""Reading a config's ``quantization_config`` into what a streaming FP8 load needs, or a typed refusal."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from automodel_plugins.errors import UnsupportedQuantizationError

SUPPORTED_METHODS = ("fp8",)


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


def quantization_dict(config: Any) -> dict[str, Any] | None:
    """The config's ``quantization_config`` as a plain dict, or None when it declares none."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UnsupportedQuantizationError(
            None, f"quantization_config must be an object, got {type(raw).__name__}"
        )
    return raw


def parse_fp8_quantization(config: Any) -> Fp8Quantization | None:
    """``None`` for an unquantized config; the parsed FP8 settings; or UnsupportedQuantizationError naming
    the field (``quantization_config.quant_method`` for e.g. ``awq``)."""
    raw = quantization_dict(config)
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise UnsupportedQuantizationError(
            None,
            f"quantization_config.quant_method {method!r} is not supported (supported: {', '.join(SUPPORTED_METHODS)})",
        )
    try:
        return Fp8Quantization.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"quantization_config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
        )
        raise UnsupportedQuantizationError(None, problems) from error
