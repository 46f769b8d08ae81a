"""The fields of a ``config.json`` the host and the stock model classes rely on, validated before transformers.

transformers builds a config from almost anything and fails later, inside a model's ``__init__`` or its rotary
table, with a ``ZeroDivisionError`` (0 attention heads), a ``KeyError`` (an unknown ``rope_type``), a ``math
domain error`` (``rope_theta: 0``) or no error at all (``factor: 0`` gives NaN frequencies). These pydantic models
state what those fields must be, so such a config is refused up front with the file and the field's dotted path.
Other fields pass through untouched (``extra="allow"``); only fields present are checked.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = ["ModelFields", "RopeParameters", "config_problems"]

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

_SUBCONFIG_SKIPPED = frozenset({"quantization_config"})  # parsed by the FP8 reader, with its own errors


def known_rope_types(model_type: str | None) -> frozenset[str]:
    """``rope_type`` values a ``model_type`` can compute: transformers' shared init functions, ``default``, and
    the model's own default (``axial`` for Pixtral's 2-D vision rotary)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    own = (
        getattr(CONFIG_MAPPING[model_type], "default_rope_type", None)
        if model_type in CONFIG_MAPPING
        else None
    )
    return frozenset({"default", *ROPE_INIT_FUNCTIONS, *([own] if isinstance(own, str) else [])})


class RopeParameters(BaseModel):
    """One rotary table's parameters (``rope_parameters``, or the legacy ``rope_scaling``)."""

    model_config = ConfigDict(extra="allow")

    rope_type: str | None = None
    type: str | None = None  # the legacy spelling of rope_type
    rope_theta: PositiveFloat | None = None
    factor: PositiveFloat | None = None
    partial_rotary_factor: Annotated[float, Field(gt=0, le=1)] | None = None
    original_max_position_embeddings: PositiveInt | None = None
    attention_factor: PositiveFloat | None = None
    beta_fast: FiniteFloat | None = None
    beta_slow: FiniteFloat | None = None
    low_freq_factor: PositiveFloat | None = None
    high_freq_factor: PositiveFloat | None = None
    short_factor: list[PositiveFloat] | None = None
    long_factor: list[PositiveFloat] | None = None
    mrope_section: list[PositiveInt] | None = None

    @field_validator("rope_type", "type")
    @classmethod
    def _known_type(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = known_rope_types((info.context or {}).get("model_type"))
        if value is not None and value not in known:
            raise ValueError(f"unknown rope type {value!r} (known: {', '.join(sorted(known))})")
        return value

    @model_validator(mode="after")
    def _llama3_band(self) -> RopeParameters:
        if self.low_freq_factor is not None and self.low_freq_factor == self.high_freq_factor:
            raise ValueError(
                "low_freq_factor and high_freq_factor must differ (their difference is a divisor)"
            )
        return self


class ModelFields(BaseModel):
    """The sizes, heads and rotary settings of one model config (the top level or a sub-config)."""

    model_config = ConfigDict(extra="allow")

    model_type: str | None = None
    architectures: list[str] | None = None
    hidden_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    num_attention_heads: PositiveInt | None = None
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    num_hidden_layers: NonNegativeInt | None = None
    depth: NonNegativeInt | None = None
    max_position_embeddings: PositiveInt | None = None
    image_size: PositiveInt | None = None
    patch_size: PositiveInt | None = None
    rope_theta: PositiveFloat | None = None
    rope_scaling: RopeParameters | None = None
    rope_parameters: RopeParameters | dict[str, RopeParameters] | None = None

    @field_validator("rope_parameters", mode="before")
    @classmethod
    def _one_table_or_one_per_layer_type(cls, value: Any, info: ValidationInfo) -> Any:
        """A flat table, or one table per layer type (``{"sliding_attention": {...}, ...}``, Gemma 3)."""
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            return {
                name: RopeParameters.model_validate(table, context=info.context)
                for name, table in value.items()
            }
        return (
            RopeParameters.model_validate(value, context=info.context) if isinstance(value, dict) else value
        )

    @model_validator(mode="after")
    def _heads_group_evenly(self) -> ModelFields:
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        return self


def _problems(data: dict[str, Any], where: str) -> list[str]:
    model_type = data.get("model_type") if isinstance(data.get("model_type"), str) else None
    try:
        ModelFields.model_validate(data, context={"model_type": model_type})
    except ValidationError as error:
        return [_describe(error_item, where) for error_item in error.errors()]
    return []


def _describe(item: dict[str, Any], where: str) -> str:
    loc = [str(part) for part in item["loc"] if not (isinstance(part, str) and part[:1].isupper())]
    # pydantic names union branches ("RopeParameters", "dict[str,RopeParameters]"): not fields, dropped above.
    field = ".".join(p for p in [where, *loc] if p and not p.startswith("dict["))
    message = item["msg"].removeprefix("Value error, ")
    got = item.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f", got {got!r}"
    return f"{field or '<root>'}: {message}{shown}"


def config_problems(data: dict[str, Any]) -> list[str]:
    """Every problem of a raw config dict and of its sub-configs (``text_config``, ``vision_config``, ...), each
    ``"<dotted field>: <what is wrong>, got <value>"``; empty for a config the model classes can build."""
    problems = _problems(data, "")
    for key, value in data.items():
        if (
            isinstance(value, dict)
            and key not in _SUBCONFIG_SKIPPED
            and (key.endswith("_config") or "model_type" in value)
        ):
            problems += _problems(value, key)
    return problems
