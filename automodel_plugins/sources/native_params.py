"""A transformers config written back as Mistral's native ``params.json``: the inverse of
:func:`~automodel_plugins.sources.native.translate_params`, field by field (the table is in
``docs/mistral-native.md``).

``convert --layout native`` of a checkpoint in transformers' form needs it: the native form has no
``config.json``. Only what the forward translation reads is written, so that ``translate_params`` of the result
gives back the config on every field a model is built from; a config field the native format cannot say (a
rope it has no name for, a non-SiLU vision tower, an MLA model whose top-k weights are not renormalized) is a
:class:`~automodel_plugins.errors.NoNativeLayoutError` naming the field, never dropped: a ``params.json`` that
describes another model than the weights would load without complaint.
"""

from __future__ import annotations

from typing import Any

from automodel_plugins.errors import NoNativeLayoutError

__all__ = ["NATIVE_TEXT_MODELS", "TEKKEN_IMAGE_TOKENS", "params_from_config"]

NATIVE_TEXT_MODELS = ("ministral3", "mistral4")
"""Text model types with a native form (alone, or inside a ``mistral3`` VLM)."""

TEKKEN_IMAGE_TOKENS = {"image_break_token_id": 12, "image_end_token_id": 13}
"""The processor's image break/end tokens of every tekken tokenizer (Large 3's ``params.json`` says so too): the
forward translation drops them (not the model's), the native format carries them."""


def params_from_config(config: Any) -> dict[str, Any]:
    """The ``params.json`` dict (keys sorted, as Mistral's are) of a ``mistral3`` VLM (text ``ministral3`` or
    ``mistral4``) or a text-only ``ministral3`` / ``mistral4`` config, without its quantization (the caller
    adds the one the weights are written in)."""
    model_type = getattr(config, "model_type", None)
    vlm = model_type == "mistral3"
    text = config.text_config if vlm else config
    text_type = getattr(text, "model_type", None)
    if text_type not in NATIVE_TEXT_MODELS or (not vlm and model_type not in NATIVE_TEXT_MODELS):
        shown = f"mistral3 with text model {text_type!r}" if vlm else repr(model_type)
        raise NoNativeLayoutError(
            f"model type {shown} has no Mistral-native form (params.json + consolidated shards): only "
            "mistral3 VLMs with a ministral3 or mistral4 text model, and text-only ministral3 / mistral4, do; "
            "write it with --layout hf"
        )
    mla = text_type == "mistral4"
    _require(text, "hidden_act", "silu")
    if getattr(text, "attention_bias", False):
        _refuse("attention_bias", True, "native attention has no bias")
    params: dict[str, Any] = {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "tied_embeddings": bool(text.tie_word_embeddings),
        "max_position_embeddings": text.max_position_embeddings,
    }
    if vlm and bool(config.tie_word_embeddings) != bool(text.tie_word_embeddings):
        _refuse("tie_word_embeddings", config.tie_word_embeddings, "the VLM and its text model disagree")
    if getattr(text, "sliding_window", None) is not None:
        _refuse("sliding_window", text.sliding_window, "the native format has no sliding-window attention")
    if mla:
        nope, rope_dim = text.qk_nope_head_dim, text.qk_rope_head_dim
        params.update(
            head_dim=nope + rope_dim,
            q_lora_rank=text.q_lora_rank,
            kv_lora_rank=text.kv_lora_rank,
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=text.v_head_dim,
            moe=_moe(text),
        )
    else:
        params["head_dim"] = text.head_dim
    params.update(_rope(text, mla))
    if vlm:
        params["vision_encoder"] = _vision(config)
    return dict(sorted(params.items()))


def _refuse(field: str, value: Any, why: str) -> None:
    raise NoNativeLayoutError(f"config field {field!r} is {value!r}: {why}, so params.json cannot say it")


def _require(section: Any, field: str, wanted: Any, prefix: str = "") -> None:
    value = getattr(section, field, wanted)
    if value != wanted:
        _refuse(prefix + field, value, f"Mistral's native format implies {wanted!r}")


def _moe(text: Any) -> dict[str, Any]:
    if not getattr(text, "norm_topk_prob", True):
        _refuse("norm_topk_prob", False, "Mistral renormalizes the top-k router weights")
    return {
        "expert_hidden_dim": text.moe_intermediate_size,
        "first_k_dense_replace": text.first_k_dense_replace,
        "num_expert_groups": text.n_group,
        "num_expert_groups_per_tok": text.topk_group,
        "num_experts": text.n_routed_experts,
        "num_experts_per_tok": text.num_experts_per_tok,
        "num_shared_experts": text.n_shared_experts,
        "route_every_n": 1,
        "routed_scale": text.routed_scaling_factor,
    }


def _rope(text: Any, mla: bool) -> dict[str, Any]:
    """``rope_parameters`` -> ``rope_theta``, ``yarn``, ``llama_4_scaling``."""
    rope = dict(text.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    out: dict[str, Any] = {"rope_theta": rope.get("rope_theta", 10_000.0)}
    if mla:
        expected = text.qk_rope_head_dim / (text.qk_nope_head_dim + text.qk_rope_head_dim)
        given = rope.get("partial_rotary_factor", expected)
        if abs(given - expected) > 1e-9:
            _refuse(
                "rope_parameters.partial_rotary_factor",
                given,
                f"MLA rotates qk_rope_head_dim of each head ({expected})",
            )
    if kind == "default":
        if "llama_4_scaling_beta" in rope:
            _refuse("rope_parameters.llama_4_scaling_beta", rope["llama_4_scaling_beta"], "it needs yarn")
        return out
    if kind != "yarn":
        _refuse("rope_parameters.rope_type", kind, "the native format has default and yarn rotaries only")
    mscale = (rope.get("mscale"), rope.get("mscale_all_dim"))
    if mscale == (1.0, 1.0):
        apply_scale = False
    elif mscale in ((None, None), (1.0, 0.0)) and not mla:
        apply_scale = True  # (1, 0): transformers' text-only Ministral 3 converter spells the default so
    else:
        _refuse(
            "rope_parameters.mscale",
            mscale,
            "yarn.apply_scale says (1, 1) (false) or, for a dense model, transformers' default (true: "
            "no mscale, or (1, 0))",
        )
    original = rope["original_max_position_embeddings"]
    out["yarn"] = {
        "alpha": rope.get("beta_slow", 1.0),
        "apply_scale": apply_scale,
        "beta": rope.get("beta_fast", 32.0),
        "factor": rope["factor"],
        "original_max_position_embeddings": original,
    }
    if rope.get("llama_4_scaling_beta") is not None:
        out["llama_4_scaling"] = {
            "beta": rope["llama_4_scaling_beta"],
            "original_max_position_embeddings": original,
        }
    return out


def _vision(config: Any) -> dict[str, Any]:
    vision = config.vision_config
    _require(vision, "hidden_act", "silu", "vision_config.")
    _require(config, "vision_feature_layer", -1)
    _require(config, "projector_hidden_act", "gelu")
    if getattr(vision, "model_type", "pixtral") != "pixtral":
        _refuse("vision_config.model_type", vision.model_type, "Mistral's vision encoder is Pixtral")
    rope = dict(getattr(vision, "rope_parameters", None) or {})
    out = {
        "adapter_bias": bool(config.multimodal_projector_bias),
        "add_pre_mm_projector_layer_norm": True,
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "image_token_id": config.image_token_id,
        "intermediate_size": vision.intermediate_size,
        "max_image_size": vision.image_size,
        "mm_projector_id": "patch_merge",
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels,
        "num_hidden_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size,
        "rope_theta": rope.get("rope_theta", 10_000.0),
        "spatial_merge_size": config.spatial_merge_size,
        **TEKKEN_IMAGE_TOKENS,
    }
    if vision.head_dim != vision.hidden_size // vision.num_attention_heads:
        out["head_dim"] = vision.head_dim  # written only where it is not the default, as Mistral does
    return dict(sorted(out.items()))
