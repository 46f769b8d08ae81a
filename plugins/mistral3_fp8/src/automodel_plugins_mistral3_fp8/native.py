"""Mistral's native tensor names <-> transformers' module names, both ways, for the whole Mistral3 family.

The table follows transformers' ``convert_mistral3_weights_to_hf.py`` (dense text, vision) and
``convert_mistral4_weight_to_hf.py`` (MLA, MoE), which vLLM's loader agrees with (``docs/mistral-native.md``).
Two things are more than a rename:

* q/k projections whose rows Mistral stores in its interleaved rotary order: the vision encoder's always, and
  the dense text model's (``ministral3``); transformers' converters permute them (``permute_for_rope``), so
  they are pieces with ``rope_heads`` (permuted on read, back on write). MLA attention (``mistral4``,
  ``rope_interleave``) is a pure rename.
* per-expert ``experts.E.w1/w3/w2`` assembled into transformers' fused ``experts.gate_up_proj [E, 2I, H]``
  (gate rows, then up) and ``down_proj [E, H, I]``: the many-to-one piece contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from automodel_plugins.adapters import Fp8StateDictAdapter, TensorSource
from automodel_plugins.adapters.pieces import stacked_boxes

# module path under a text layer (transformers) -> native module path
_TEXT_LAYER = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_a_proj": "attention.wq_a",
    "self_attn.q_a_layernorm": "attention.q_a_norm",
    "self_attn.q_b_proj": "attention.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a_with_mqa",
    "self_attn.kv_a_layernorm": "attention.kv_a_norm",
    "self_attn.kv_b_proj": "attention.wkv_b",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.gate": "gate",
    "mlp.shared_experts.gate_proj": "shared_experts.w1",
    "mlp.shared_experts.down_proj": "shared_experts.w2",
    "mlp.shared_experts.up_proj": "shared_experts.w3",
}
_VISION_LAYER = {
    "attention.q_proj": "attention.wq",
    "attention.k_proj": "attention.wk",
    "attention.v_proj": "attention.wv",
    "attention.o_proj": "attention.wo",
    "feed_forward.gate_proj": "feed_forward.w1",
    "feed_forward.down_proj": "feed_forward.w2",
    "feed_forward.up_proj": "feed_forward.w3",
    "attention_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
_VLM_PREFIXES = (
    ("lm_head.", "output."),
    ("model.vision_tower.", "vision_encoder."),
    ("model.multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
    ("model.multi_modal_projector.linear_2.", "vision_language_adapter.w_out."),
    ("model.multi_modal_projector.patch_merger.", "patch_merger."),
    ("model.multi_modal_projector.norm.", "pre_mm_projector_norm."),
)
_LAYER = re.compile(r"^(?P<stack>(?:transformer\.)?layers)\.(?P<n>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$")
_FUSED = re.compile(r"^layers\.(?P<n>\d+)\.mlp\.experts\.(?P<leaf>gate_up_proj|down_proj)$")

NATIVE_MARKERS = ("tok_embeddings.", "layers.", "output.", "vision_encoder.")
"""Key prefixes only the native form has (the HF forms start with ``model.``, ``language_model.``, ``lm_head``)."""


def is_native(keys: Any) -> bool:
    """Whether a checkpoint's keys are Mistral's native names."""
    return any(key.startswith(NATIVE_MARKERS) for key in keys)


@dataclass
class MistralNativeAdapter(Fp8StateDictAdapter):
    """The FP8 adapter over native names: renames both ways, rotary-order q/k rows, per-expert pieces."""

    config: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layout = "native"
        vlm = getattr(self.config, "text_config", None) is not None
        self._text = getattr(self.config, "text_config", None) if vlm else self.config
        self._vision = getattr(self.config, "vision_config", None) if vlm else None
        self._text_prefix = "model.language_model." if vlm else "model."
        self._prefixes = ((self._text_prefix, ""), *(_VLM_PREFIXES if vlm else (("lm_head.", "output."),)))
        self._mla = getattr(self._text, "model_type", None) == "mistral4"

    # --- names -------------------------------------------------------------------------------------------

    def to_hf(self, name: str) -> str:
        for model, native in sorted(self._prefixes, key=lambda rule: -len(rule[0])):
            if name.startswith(model):
                rest = name[len(model) :]
                table = (
                    _VISION_LAYER if native == "vision_encoder." else _TEXT_LAYER if native == "" else None
                )
                if native == "" and rest.startswith("embed_tokens."):
                    return "tok_embeddings." + rest[len("embed_tokens.") :]
                return native + (_rename_layer(rest, table) if table else rest)
        return name

    def from_hf_key(self, key: str) -> str:
        for model, native in sorted(self._prefixes, key=lambda rule: -len(rule[1])):
            if native == "" and key.startswith(tuple(n for _, n in self._prefixes if n)):
                continue
            if key.startswith(native):
                rest = key[len(native) :]
                if native == "" and rest.startswith("tok_embeddings."):
                    return model + "embed_tokens." + rest[len("tok_embeddings.") :]
                table = (
                    _VISION_LAYER if native == "vision_encoder." else _TEXT_LAYER if native == "" else None
                )
                return model + (_rename_layer(rest, _inverse(table)) if table else rest)
        return key

    # --- sources -----------------------------------------------------------------------------------------

    def from_hf(self, name: str) -> TensorSource:
        if name.startswith(self._text_prefix):
            fused = _FUSED.match(name[len(self._text_prefix) :])
            if fused is not None:
                return self._experts(name, int(fused["n"]), fused["leaf"])
        source = super().from_hf(name)
        heads = self._rope_heads(name)
        if heads is None:
            return source
        (piece,) = source.parts()
        return TensorSource.assembled([replace(piece, rope_heads=heads)])

    def _rope_heads(self, name: str) -> int | None:
        """Heads of a q/k weight stored in interleaved rotary order (vision always, dense text too)."""
        if not name.endswith((".q_proj.weight", ".k_proj.weight")):
            return None
        if name.startswith("model.vision_tower."):
            return int(self._vision.num_attention_heads)
        if self._mla:
            return None
        if name.endswith(".q_proj.weight"):
            return int(self._text.num_attention_heads)
        return int(self._text.num_key_value_heads)

    def _experts(self, name: str, layer: int, leaf: str) -> TensorSource:
        experts = int(self._text.n_routed_experts)
        width, hidden = int(self._text.moe_intermediate_size), int(self._text.hidden_size)
        if leaf == "gate_up_proj":
            boxes = stacked_boxes((experts, 2 * width, hidden), 2, dim=1)
            pairs = [
                (f"layers.{layer}.experts.{e}.{w}.weight", boxes[e][part])
                for e in range(experts)
                for part, w in enumerate(("w1", "w3"))
            ]
        else:
            boxes = stacked_boxes((experts, hidden, width), 1, dim=1)
            pairs = [(f"layers.{layer}.experts.{e}.w2.weight", boxes[e][0]) for e in range(experts)]
        return self.assembled(name, pairs)


def _rename_layer(rest: str, table: dict[str, str]) -> str:
    match = _LAYER.match(rest)
    if match is None:
        return rest
    module = table.get(match["module"], match["module"])
    return f"{match['stack']}.{match['n']}.{module}.{match['leaf']}"


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {native: model for model, native in table.items()}
