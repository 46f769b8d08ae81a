"""Mistral's native ``params.json`` translated, field by field, into the transformers config it describes.

Mistral publishes some checkpoints (Mistral Large 3) only in its own format: a ``params.json`` instead of a
``config.json``, and ``consolidated*.safetensors`` with native tensor names. transformers (5.25) has no importer
for it; its conversion scripts (``convert_mistral3_weights_to_hf.py``, ``convert_mistral4_weight_to_hf.py``) and
vLLM's config adaptor (``vllm/transformers_utils/configs/mistral.py``) hold the mapping, which this module
follows. The translation is a pure function of the JSON: :func:`translate_params` gives the ``config.json``
dict (``model_type`` and all), so everything downstream (claims, ``inspect``, ``build_model``, loads) sees an
ordinary config. The table is in ``docs/mistral-native.md``.

Which model: MLA fields (``q_lora_rank`` ...) and a ``moe`` section make a ``mistral4`` text model (Mistral
Large 3, Mistral Small 4); otherwise a dense ``ministral3`` one (Ministral 3, Devstral 2, Medium 3.5). A
``vision_encoder`` section makes a ``mistral3`` VLM around it with a Pixtral vision tower.

Every field must be known: an unknown or contradictory one is a :class:`ConfigError` naming ``params.json``
and the field, since silently dropping it could build another model than the one published.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError
from automodel_plugins.sources.compressed_tensors import translate_compressed_tensors

__all__ = ["PARAMS_NAME", "translate_params"]

PARAMS_NAME = "params.json"

_TEXT_RENAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "norm_eps": "rms_norm_eps",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}
"""native field -> HF text field (the same in both conversion scripts and vLLM)."""

_REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size")

_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

_MOE_RENAMES = {
    "num_experts": "n_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "expert_hidden_dim": "moe_intermediate_size",
    "first_k_dense_replace": "first_k_dense_replace",
    "num_shared_experts": "n_shared_experts",
    "routed_scale": "routed_scaling_factor",
    "num_expert_groups": "n_group",
    "num_expert_groups_per_tok": "topk_group",
}
_MOE_PARALLEL_HINTS = ("expert_parallel", "expert_model_parallel")
"""How Mistral's own trainer sharded the experts: nothing about the model."""

_KNOWN_TOP = {
    *_TEXT_RENAMES,
    *_MLA_FIELDS,
    "rope_theta",
    "tied_embeddings",
    "max_position_embeddings",
    "max_seq_len",
    "sliding_window",
    "yarn",
    "llama_4_scaling",
    "moe",
    "vision_encoder",
    "quantization",
    "quantization_config",
}

_VISION_TO_PIXTRAL = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "rope_theta",
    "head_dim",
)
_VISION_DROPPED = ("image_break_token_id", "image_end_token_id", "max_image_size")
"""Read by the processor (image break/end tokens, the resize bound), not by the model."""
_VISION_KNOWN = {
    *_VISION_TO_PIXTRAL,
    *_VISION_DROPPED,
    "adapter_bias",
    "spatial_merge_size",
    "image_token_id",
    "mm_projector_id",
    "add_pre_mm_projector_layer_norm",
}

# Token ids of every Mistral tekken tokenizer (transformers' Mistral4 conversion sets the same).
_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}


def translate_params(params: Mapping[str, Any], path: str | Path | None = PARAMS_NAME) -> dict[str, Any]:
    """The ``config.json`` dict (``mistral3``, ``ministral3`` or ``mistral4``) that ``params`` describes.

    ``path`` names the file in errors. Raises :class:`ConfigError` for an unknown, missing or contradictory
    field and :class:`UnsupportedQuantizationError` for a quantization the host cannot read.
    """
    at = _Where(path)
    unknown = sorted(set(params) - _KNOWN_TOP)
    if unknown:
        raise at.error(
            unknown[0], "unknown field (not in Mistral's params.json as this translation knows it)"
        )
    missing = [field for field in _REQUIRED if params.get(field) is None]
    if missing:
        raise at.error(missing[0], "missing field")
    mla = {field: params.get(field) for field in _MLA_FIELDS}
    is_mla = any(value is not None for value in mla.values())
    if is_mla and any(value is None for value in mla.values()):
        absent = next(field for field, value in mla.items() if value is None)
        raise at.error(absent, "an MLA model needs all of " + ", ".join(_MLA_FIELDS))
    moe = params.get("moe")
    if moe is not None and not is_mla:
        raise at.error("moe", "a mixture of experts without MLA attention (Mixtral) is not translated")
    if is_mla and moe is None:
        raise at.error("moe", "an MLA model (mistral4) is translated only with its moe section")

    text: dict[str, Any] = {"model_type": "mistral4" if is_mla else "ministral3", **_TOKEN_IDS}
    for native, hf in _TEXT_RENAMES.items():
        if params.get(native) is not None:
            text[hf] = _number(at, native, params[native])
    text["tie_word_embeddings"] = _flag(at, "tied_embeddings", params.get("tied_embeddings", False))
    text["max_position_embeddings"] = _max_positions(at, params)
    if params.get("sliding_window") is not None:
        raise at.error(
            "sliding_window", "sliding-window attention is not translated (no published model uses it)"
        )
    if is_mla:
        for field in _MLA_FIELDS:
            text[field] = _number(at, field, mla[field])
        if (
            params.get("head_dim") is not None
            and params["head_dim"] != mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
        ):
            raise at.error(
                "head_dim",
                f"{params['head_dim']} is not qk_nope_head_dim + qk_rope_head_dim "
                f"({mla['qk_nope_head_dim']} + {mla['qk_rope_head_dim']})",
            )
        text.pop("head_dim", None)  # Mistral4Config derives it
        text.update(_moe(at, moe))
    text["rope_parameters"] = _rope(at, params, mla if is_mla else None)

    quantization = _quantization(at, params, vision=params.get("vision_encoder") is not None, mla=is_mla)
    vision = params.get("vision_encoder")
    if vision is None:
        text["architectures"] = ["Mistral4ForCausalLM" if is_mla else "Ministral3ForCausalLM"]
        if quantization is not None:
            text["quantization_config"] = quantization
        return text
    config = _vlm(at, vision, text)
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


class _Where:
    def __init__(self, path: str | Path | None) -> None:
        self.path = path

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"field {field!r}: {message}")

    def unsupported(self, field: str, message: str) -> UnsupportedQuantizationError:
        return UnsupportedQuantizationError(self.path, f"field {field!r}: {message}")


def _number(at: _Where, field: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.error(field, f"must be a number, got {value!r}")
    return value


def _flag(at: _Where, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise at.error(field, f"must be true or false, got {value!r}")
    return value


def _object(at: _Where, field: str, value: Any, known: set[str] | tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise at.error(field, f"must be an object, got {value!r}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise at.error(f"{field}.{unknown[0]}", "unknown field")
    return value


def _max_positions(at: _Where, params: Mapping[str, Any]) -> int:
    """``max_position_embeddings`` (Large 3, Ministral 3), else ``max_seq_len`` (older releases); both must agree."""
    given = {f: params[f] for f in ("max_position_embeddings", "max_seq_len") if params.get(f) is not None}
    if len(set(given.values())) > 1:
        raise at.error("max_seq_len", f"{given['max_seq_len']} contradicts max_position_embeddings")
    if not given:
        raise at.error("max_position_embeddings", "missing field (nor max_seq_len)")
    field, value = next(iter(given.items()))
    return int(_number(at, field, value))


def _moe(at: _Where, moe: Any) -> dict[str, Any]:
    section = _object(at, "moe", moe, {*_MOE_RENAMES, *_MOE_PARALLEL_HINTS, "route_every_n"})
    if section.get("route_every_n", 1) != 1:
        raise at.error(
            "moe.route_every_n",
            f"{section['route_every_n']}: only 1 (every layer after the dense ones) is built by Mistral4",
        )
    out = {
        hf: _number(at, f"moe.{native}", section[native])
        for native, hf in _MOE_RENAMES.items()
        if native in section
    }
    for needed in ("num_experts", "num_experts_per_tok", "expert_hidden_dim"):
        if needed not in section:
            raise at.error(f"moe.{needed}", "missing field")
    out["norm_topk_prob"] = True  # both converters and vLLM: Mistral renormalizes the top-k weights
    return out


def _rope(at: _Where, params: Mapping[str, Any], mla: dict[str, Any] | None) -> dict[str, Any]:
    """``rope_theta`` + ``yarn`` + ``llama_4_scaling`` -> transformers' ``rope_parameters``."""
    theta = float(_number(at, "rope_theta", params.get("rope_theta", 10_000.0)))
    yarn = params.get("yarn")
    scaling = params.get("llama_4_scaling")
    if yarn is None:
        if scaling is not None:
            raise at.error("llama_4_scaling", "given without yarn: no transformers rope carries it alone")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    else:
        section = _object(
            at, "yarn", yarn, ("factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale")
        )
        for needed in ("factor", "original_max_position_embeddings"):
            if needed not in section:
                raise at.error(f"yarn.{needed}", "missing field")
        rope = {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": float(_number(at, "yarn.factor", section["factor"])),
            "original_max_position_embeddings": int(
                _number(
                    at, "yarn.original_max_position_embeddings", section["original_max_position_embeddings"]
                )
            ),
            "beta_fast": float(_number(at, "yarn.beta", section.get("beta", 32.0))),
            "beta_slow": float(_number(at, "yarn.alpha", section.get("alpha", 1.0))),
        }
        # apply_scale false: no magnitude correction (vLLM: attention_factor 1). Spelled as transformers'
        # DeepSeek-style mscale pair, whose ratio is 1, as transformers' own Mistral converters write it.
        if not _flag(at, "yarn.apply_scale", section.get("apply_scale", True)) or mla is not None:
            rope["mscale"] = 1.0
            rope["mscale_all_dim"] = 1.0
        if scaling is not None:
            beta = _object(at, "llama_4_scaling", scaling, ("beta", "original_max_position_embeddings"))
            if "beta" not in beta:
                raise at.error("llama_4_scaling.beta", "missing field")
            original = beta.get("original_max_position_embeddings", rope["original_max_position_embeddings"])
            if original != rope["original_max_position_embeddings"]:
                raise at.error(
                    "llama_4_scaling.original_max_position_embeddings",
                    f"{original} contradicts yarn.original_max_position_embeddings "
                    f"{rope['original_max_position_embeddings']} (transformers keeps one value for both)",
                )
            rope["llama_4_scaling_beta"] = float(_number(at, "llama_4_scaling.beta", beta["beta"]))
    if mla is not None:
        rope["partial_rotary_factor"] = mla["qk_rope_head_dim"] / (
            mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
        )
    return rope


def _vlm(at: _Where, vision: Any, text: dict[str, Any]) -> dict[str, Any]:
    section = _object(at, "vision_encoder", vision, _VISION_KNOWN)
    projector = section.get("mm_projector_id", "patch_merge")
    if projector != "patch_merge":
        raise at.error(
            "vision_encoder.mm_projector_id", f"{projector!r}: Mistral3 has the patch_merge projector only"
        )
    if not _flag(
        at,
        "vision_encoder.add_pre_mm_projector_layer_norm",
        section.get("add_pre_mm_projector_layer_norm", True),
    ):
        raise at.error(
            "vision_encoder.add_pre_mm_projector_layer_norm",
            "false: Mistral3's projector always has that norm",
        )
    for needed in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "spatial_merge_size",
    ):
        if needed not in section:
            raise at.error(f"vision_encoder.{needed}", "missing field")
    pixtral = {"model_type": "pixtral", "hidden_act": "silu"}
    pixtral.update(
        {f: _number(at, f"vision_encoder.{f}", section[f]) for f in _VISION_TO_PIXTRAL if f in section}
    )
    if "rope_theta" in pixtral:  # PixtralVisionConfig reads rope_parameters
        pixtral["rope_parameters"] = {"rope_type": "default", "rope_theta": float(pixtral.pop("rope_theta"))}
    tie = text["tie_word_embeddings"]
    return {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": pixtral,
        "multimodal_projector_bias": _flag(
            at, "vision_encoder.adapter_bias", section.get("adapter_bias", False)
        ),
        "image_token_id": int(
            _number(at, "vision_encoder.image_token_id", section.get("image_token_id", 10))
        ),
        "spatial_merge_size": int(
            _number(at, "vision_encoder.spatial_merge_size", section["spatial_merge_size"])
        ),
        "vision_feature_layer": -1,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": tie,  # Mistral3Config defaults it to True whatever text_config says
    }


# --- quantization ----------------------------------------------------------------------------------------

_MISTRAL_SCHEMES = {"TENSOR": "static", "NO_SCALES": "dynamic"}


def _quantization(at: _Where, params: Mapping[str, Any], *, vision: bool, mla: bool) -> dict[str, Any] | None:
    """Mistral's own ``quantization`` (``qformat_weight: fp8_e4m3``, per-tensor) or a compressed-tensors
    ``quantization_config`` -> the ``quant_method: fp8`` dict the host's FP8 machinery reads."""
    own, compressed = params.get("quantization"), params.get("quantization_config")
    if own is not None and compressed is not None:
        raise at.error("quantization_config", "given beside quantization: which one applies is ambiguous")
    not_converted = (
        ["model.vision_tower", "model.multi_modal_projector", "lm_head"] if vision else ["lm_head"]
    )
    if own is not None:
        section = _object(at, "quantization", own, ("qformat_weight", "qscheme_act"))
        if section.get("qformat_weight") != "fp8_e4m3":
            raise at.unsupported(
                "quantization.qformat_weight", f"{section.get('qformat_weight')!r}: only 'fp8_e4m3' is read"
            )
        scheme = section.get("qscheme_act", "TENSOR")
        if scheme not in _MISTRAL_SCHEMES:
            raise at.unsupported(
                "quantization.qscheme_act", f"{scheme!r}: only TENSOR and NO_SCALES are read"
            )
        return {
            "quant_method": "fp8",
            "activation_scheme": _MISTRAL_SCHEMES[scheme],
            "weight_block_size": None,
            "modules_to_not_convert": not_converted,
        }
    if compressed is None:
        return None
    return _compressed_tensors(at, compressed, vision=vision)


_IGNORED_PREFIXES = {
    "model.embed_tokens": "model.language_model.embed_tokens",
    "lm_head": "lm_head",
    "re:vision_encoder.*": "model.vision_tower",
    "re:patch_merger.*": "model.multi_modal_projector.patch_merger",
    "re:vision_language_adapter.*": "model.multi_modal_projector.linear_1 model.multi_modal_projector.linear_2",
}
"""compressed-tensors ``ignore`` entries (native module names) -> the runtime module prefixes they cover."""

_SUFFIX_PATTERN = re.compile(r"^re:\.\*([A-Za-z_][A-Za-z0-9_]*)\$$")
"""``re:.*kv_a_proj_with_mqa$``: every module of that leaf name, kept BF16 (its tensors' dtype says so)."""


def _compressed_tensors(at: _Where, compressed: Any, *, vision: bool) -> dict[str, Any]:
    """compressed-tensors FP8 (the host's one reading, ``sources/compressed_tensors.py``), its ``ignore`` list in
    native module names."""

    def ignore(listed: list[Any], _: Any) -> list[str]:
        return _not_converted(at, listed, vision=vision)

    return translate_compressed_tensors(compressed, path=at.path, ignore=ignore)


def _not_converted(at: _Where, ignore: Any, *, vision: bool) -> list[str]:
    if not isinstance(ignore, list):
        raise at.error("quantization_config.ignore", f"must be a list, got {ignore!r}")
    prefixes: list[str] = []
    for entry in ignore:
        if isinstance(entry, str) and entry in _IGNORED_PREFIXES:
            mapped = _IGNORED_PREFIXES[entry]
            if not vision:
                mapped = mapped.replace("model.language_model.", "model.")
            if vision or not mapped.startswith(("model.vision_tower", "model.multi_modal_projector")):
                prefixes += mapped.split()
        elif not (isinstance(entry, str) and _SUFFIX_PATTERN.match(entry)):
            raise at.unsupported(
                "quantization_config.ignore",
                f"entry {entry!r} cannot be mapped onto module names (known: "
                + ", ".join(_IGNORED_PREFIXES)
                + ", and re:.*<leaf name>$)",
            )
    return prefixes
