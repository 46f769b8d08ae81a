"""Tiny stock configs and batches for tests: a Mistral3 VLM (Ministral 3 text, Pixtral vision), a text-only
Ministral 3 (Devstral 2's class), a Qwen3-VL, a Qwen3-VL-MoE and a Llama, small enough to build on CPU in milliseconds, with the real checkpoints' rotary settings.

Every size is a keyword, so a test can ask for awkward ones (odd hidden sizes, partial FP8 blocks). torch and
transformers are imported inside the functions: importing this module is cheap, and the read-only mappings
(:data:`TINY_TEXT_SIZES`, :data:`MINISTRAL3_ROPE_PARAMETERS`, ...) also serve ``config.json`` payloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, Ministral3Config, Mistral3Config, Qwen3VLConfig, Qwen3VLMoeConfig

__all__ = [
    "MINISTRAL3_ROPE_PARAMETERS",
    "MINISTRAL3_TEXT_ROPE_PARAMETERS",
    "MISTRAL3_IMAGE_TOKEN_ID",
    "QWEN3_VL_IMAGE_TOKEN_ID",
    "QWEN3_VL_VISION_END_TOKEN_ID",
    "QWEN3_VL_VISION_START_TOKEN_ID",
    "TINY_LLAMA_SIZES",
    "TINY_MOE_SIZES",
    "TINY_PIXTRAL_SIZES",
    "TINY_QWEN3_VL_VISION",
    "TINY_TEXT_SIZES",
    "mistral3_image_batch",
    "mistral3_image_tokens",
    "qwen3_vl_image_batch",
    "text_batch",
    "tiny_llama_config",
    "tiny_ministral3_config",
    "tiny_mistral3_config",
    "tiny_qwen3_vl_config",
    "tiny_qwen3_vl_moe_config",
]

MINISTRAL3_ROPE_PARAMETERS: Mapping[str, Any] = MappingProxyType(
    {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    }
)
"""The ``rope_parameters`` of the released Ministral 3 / Devstral checkpoints (YaRN + llama-4 scaling)."""

MINISTRAL3_TEXT_ROPE_PARAMETERS: Mapping[str, Any] = MappingProxyType(
    {**MINISTRAL3_ROPE_PARAMETERS, "mscale_all_dim": 0.0}
)
"""What transformers' Ministral 3 conversion writes for a text-only model (Devstral 2 123B): YaRN with
``mscale_all_dim`` 0 (1 for the vision models), so the rotary's ``attention_scaling`` is ``0.1 ln(factor) + 1``."""

TINY_TEXT_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
    }
)
"""A two-layer decoder: 4 query heads and 2 KV heads of 16, vocabulary 256."""

TINY_PIXTRAL_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 16,
        "image_size": 64,
        "patch_size": 8,
    }
)
"""A one-layer Pixtral tower with 8-pixel patches."""

TINY_QWEN3_VL_VISION: Mapping[str, Any] = MappingProxyType(
    {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 8,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
)
"""A one-block Qwen3-VL tower (deepstack at block 0), 8-pixel patches merged 2x2, projecting to hidden 64."""

TINY_LLAMA_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    }
)
"""A two-layer Llama, hidden 32 (4 heads of 8, 2 KV heads), vocabulary 64."""

TINY_MOE_SIZES: Mapping[str, int] = MappingProxyType(
    {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}
)
"""Four experts, two per token, expert intermediate 24: ``2 I = 48`` is not the hidden size 64 (stock's fused
loader cannot tell ``[E, H, 2I]`` from ``[E, 2I, H]`` when they are equal), and 24 leaves partial 16-blocks."""

MISTRAL3_IMAGE_TOKEN_ID = 10
QWEN3_VL_IMAGE_TOKEN_ID, QWEN3_VL_VISION_START_TOKEN_ID, QWEN3_VL_VISION_END_TOKEN_ID = 200, 199, 198


def tiny_mistral3_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    vocab_size: int = 256,
    max_position_embeddings: int = 262144,
    rope_parameters: Mapping[str, Any] | None = MINISTRAL3_ROPE_PARAMETERS,
    text_model_type: str = "ministral3",
    vision: Mapping[str, Any] | None = None,
    image_token_id: int = MISTRAL3_IMAGE_TOKEN_ID,
    spatial_merge_size: int = 2,
    tie_word_embeddings: bool = False,
    architectures: Sequence[str] | None = None,
    **text_overrides: Any,
) -> Mistral3Config:
    """A ``Mistral3Config``: a Ministral 3 text model (``text_model_type="mistral"``: a Mistral Small 3.x style
    one) under a :data:`TINY_PIXTRAL_SIZES` tower, updated with ``vision``.

    ``rope_parameters`` is copied into the text config; ``None`` leaves the text config class's default.
    ``text_overrides`` go to the text config as well.
    """
    from transformers import AutoConfig, Mistral3Config, PixtralVisionConfig

    text: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        **text_overrides,
    }
    if rope_parameters is not None:
        text["rope_parameters"] = dict(rope_parameters)
    extra: dict[str, Any] = {} if architectures is None else {"architectures": list(architectures)}
    return Mistral3Config(
        text_config=AutoConfig.for_model(text_model_type, **text),
        vision_config=PixtralVisionConfig(**{**TINY_PIXTRAL_SIZES, **(vision or {})}),
        image_token_id=image_token_id,
        spatial_merge_size=spatial_merge_size,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
    )


def tiny_ministral3_config(
    *,
    rope_parameters: Mapping[str, Any] | None = MINISTRAL3_TEXT_ROPE_PARAMETERS,
    max_position_embeddings: int = 262144,
    tie_word_embeddings: bool = False,
    architectures: Sequence[str] | None = ("Ministral3ForCausalLM",),
    **sizes: Any,
) -> Ministral3Config:
    """A text-only ``Ministral3Config`` (``Ministral3ForCausalLM``: Devstral 2 123B's class) of
    :data:`TINY_TEXT_SIZES` updated with ``sizes``, with the text-only conversion's YaRN rotary."""
    from transformers import Ministral3Config

    extra: dict[str, Any] = {} if architectures is None else {"architectures": list(architectures)}
    if rope_parameters is not None:
        extra["rope_parameters"] = dict(rope_parameters)
    return Ministral3Config(
        **{**TINY_TEXT_SIZES, **sizes},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
    )


def text_batch(
    config: Any, *, batch: int = 2, seq: int = 16, seed: int = 1, labels: bool = True
) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` of a text model (the vocabulary of ``config``, or of its ``text_config``), with
    ``attention_mask`` and (if asked) ``labels`` equal to the ids."""
    import torch

    vocab = getattr(config, "text_config", config).vocab_size
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if labels:
        out["labels"] = input_ids.clone()
    return out


def mistral3_image_tokens(config: Mistral3Config, image_hw: tuple[int, int]) -> int:
    """How many image tokens one ``image_hw`` image takes: one per ``patch x merge`` square."""
    side = config.vision_config.patch_size * config.spatial_merge_size
    return (image_hw[0] // side) * (image_hw[1] // side)


def mistral3_image_batch(
    config: Mistral3Config,
    *,
    batch: int = 2,
    seq: int = 16,
    image_hw: tuple[int, int] = (32, 48),
    image_rows: int | None = None,
    image_start: int = 1,
    seed: int = 1,
    labels: bool = True,
    attention_mask: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Random text ids (above the image token id) with one ``image_hw`` image in each of the first
    ``image_rows`` rows (``None``: every row), its tokens from position ``image_start``.

    Holds ``input_ids``, ``attention_mask`` (all ones, if asked), ``pixel_values`` (cast to ``dtype`` if
    given), ``image_sizes`` and ``labels`` (if asked: the ids, with the prompt and the image ignored in the
    rows holding one). The ids are drawn before the pixels, from one generator seeded with ``seed``.
    """
    import torch

    rows = batch if image_rows is None else image_rows
    image_token = config.image_token_id
    end = image_start + mistral3_image_tokens(config, image_hw)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(
        image_token + 1, config.text_config.vocab_size, (batch, seq), generator=generator
    )
    input_ids[:rows, image_start:end] = image_token
    pixel_values = torch.randn(rows, 3, *image_hw, generator=generator)
    out = {"input_ids": input_ids}
    if attention_mask:
        out["attention_mask"] = torch.ones_like(input_ids)
    out["pixel_values"] = pixel_values if dtype is None else pixel_values.to(dtype)
    out["image_sizes"] = torch.tensor([list(image_hw)] * rows)
    if labels:
        out["labels"] = input_ids.clone()
        out["labels"][:rows, :end] = -100
    return out


def tiny_qwen3_vl_config(
    *,
    intermediate_size: int = 128,
    rope_theta: float = 5e6,
    num_position_embeddings: int = 64,
    tie_word_embeddings: bool = False,
    **text_overrides: Any,
) -> Qwen3VLConfig:
    """A ``Qwen3VLConfig``: a :data:`TINY_TEXT_SIZES` text model with M-RoPE (sections 2/3/3) under a
    :data:`TINY_QWEN3_VL_VISION` tower; image / vision start / vision end tokens 200 / 199 / 198."""
    from transformers import Qwen3VLConfig

    text = {
        **TINY_TEXT_SIZES,
        "intermediate_size": intermediate_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3]},
        **text_overrides,
    }
    return _qwen3_vl_family(Qwen3VLConfig, text, num_position_embeddings, tie_word_embeddings)


def _qwen3_vl_family(
    config_class: type[Any], text: dict[str, Any], num_position_embeddings: int, tie_word_embeddings: bool
) -> Any:
    """A Qwen3-VL (dense or MoE) config of ``text`` under the :data:`TINY_QWEN3_VL_VISION` tower projecting to
    its width, with the kit's image / vision start / vision end tokens."""
    vision = {
        **TINY_QWEN3_VL_VISION,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": num_position_embeddings,
        "deepstack_visual_indexes": list(TINY_QWEN3_VL_VISION["deepstack_visual_indexes"]),
    }
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN3_VL_IMAGE_TOKEN_ID,
        vision_start_token_id=QWEN3_VL_VISION_START_TOKEN_ID,
        vision_end_token_id=QWEN3_VL_VISION_END_TOKEN_ID,
        tie_word_embeddings=tie_word_embeddings,
    )


def qwen3_vl_image_batch(
    config: Any,
    *,
    batch: int = 2,
    seq: int = 12,
    grid_thw: tuple[int, int, int] = (1, 4, 4),
    seed: int = 1,
    labels: bool = True,
) -> dict[str, torch.Tensor]:
    """A Qwen3-VL (or Qwen3-VL-MoE) batch: random text ids with, in the first row,
    ``<vision_start> <image> x N <vision_end>`` from position 2 for one ``grid_thw`` image (``N`` = its patches
    over the spatial merge), its ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``, an
    ``attention_mask``, and (if asked) ``labels`` ignoring the first row's prompt and image and the second row's
    first two tokens. Drawn from one generator seeded with ``seed``: ids, then pixels."""
    import torch

    vision = config.vision_config
    tokens = grid_thw[0] * grid_thw[1] * grid_thw[2] // vision.spatial_merge_size**2
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vision_end_token_id, (batch, seq), generator=generator)
    span = [config.vision_start_token_id, *[config.image_token_id] * tokens, config.vision_end_token_id]
    input_ids[0, 2 : 2 + len(span)] = torch.tensor(span)
    patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(patches, features, generator=generator),
        "image_grid_thw": torch.tensor([list(grid_thw)]),
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),
    }
    if labels:
        out["labels"] = input_ids.clone()
        out["labels"][0, : 2 + len(span)] = -100
        out["labels"][1:, :2] = -100
    return out


def tiny_qwen3_vl_moe_config(
    *,
    rope_theta: float = 5e6,
    num_position_embeddings: int = 64,
    tie_word_embeddings: bool = False,
    mlp_only_layers: Sequence[int] = (),
    **text_overrides: Any,
) -> Qwen3VLMoeConfig:
    """A ``Qwen3VLMoeConfig``: a :data:`TINY_TEXT_SIZES` text model whose every layer is a
    :data:`TINY_MOE_SIZES` mixture of experts (except ``mlp_only_layers``: dense MLPs of ``intermediate_size``
    128), M-RoPE as :func:`tiny_qwen3_vl_config`, under the same :data:`TINY_QWEN3_VL_VISION` tower."""
    from transformers import Qwen3VLMoeConfig

    text = {
        **TINY_TEXT_SIZES,
        **TINY_MOE_SIZES,
        "intermediate_size": 128,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(mlp_only_layers),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3]},
        **text_overrides,
    }
    return _qwen3_vl_family(Qwen3VLMoeConfig, text, num_position_embeddings, tie_word_embeddings)


def tiny_llama_config(
    *,
    tie_word_embeddings: bool = False,
    architectures: Sequence[str] | None = ("LlamaForCausalLM",),
    **sizes: Any,
) -> LlamaConfig:
    """A ``LlamaConfig`` of :data:`TINY_LLAMA_SIZES` updated with ``sizes`` (any ``LlamaConfig`` keyword);
    ``architectures=None`` leaves the config's default."""
    from transformers import LlamaConfig

    extra: dict[str, Any] = {} if architectures is None else {"architectures": list(architectures)}
    return LlamaConfig(**{**TINY_LLAMA_SIZES, **sizes}, tie_word_embeddings=tie_word_embeddings, **extra)
