"""Mistral's native form as what a conversion writes: ``params.json``, ``consolidated*.safetensors``, native
names, from a source in either form (``automodel-plugins convert SRC DST --layout native``).

Three parts, each headers-only:

* **Names.** The claiming plugin's own ``state_dict_adapter`` maps model names to native keys, the same map a
  native load runs forwards: it is asked with :class:`NativeLayout`, a native checkpoint holding no tensor yet,
  so every answer is a plain piece (its key, its box of the model tensor, rows in Mistral's rotary order where
  transformers' converters permute them, per-expert ``w1/w3/w2`` of the fused experts). An adapter that is not
  a native one means the model has no native form: :class:`~automodel_plugins.errors.NoNativeLayoutError`.
* **Quantization** (:func:`native_quantization`): ``--to bf16`` declares none; ``--to fp8-tensor`` is Mistral's
  own (``quantization: {qformat_weight: fp8_e4m3, qscheme_act: NO_SCALES}``, a 0-d fp32 ``qscale_weight``);
  ``--to fp8-block`` is Large 3's compressed-tensors FP8_BLOCK (``weight_scale`` grids, BF16 where fresh, dynamic
  per-group activations, Large 3's ``ignore`` list). Both quantize the text stack's linears and the experts;
  the router stays BF16 (and, in blocks, ``q_a_proj`` and ``kv_a_proj_with_mqa``, as Large 3's list says).
* **Scales** (:func:`plan_native`): a piece keeps its source scale where the source stored the same values at
  the same granularity (the same native key; or, per tensor, the same whole tensor, since a permutation of
  rows leaves one scale valid; one expert's of a fused ``[E, 1, 1]`` scale), in the source's dtype, so FP8 in,
  FP8 out keeps the source's bytes; elsewhere ``amax / 448``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.adapters.pieces import PieceGeometry
from automodel_plugins.errors import NoNativeLayoutError, SaveOptionError
from automodel_plugins.fp8.scales import grid_shape
from automodel_plugins.pipeline.save.plan import (
    ModelTensor,
    PlannedScale,
    PlannedWrite,
    SaveFormat,
    SavePlan,
    SourceView,
    partial_blocks,
)
from automodel_plugins.sources.native_params import params_from_config

if TYPE_CHECKING:
    from automodel_plugins.adapters import Piece, StateDictAdapter

__all__ = ["NativeLayout", "native_params_bytes", "native_quantization", "plan_native"]

_QUANTIZED_FIELDS = ("quantization", "quantization_config")
_TENSOR_SCALE = ("qscale_weight", torch.float32)
_BLOCK_SCALE = ("weight_scale", torch.bfloat16)
_ROUTER = "gate"
_BLOCK_IGNORED_LEAVES = ("kv_a_proj_with_mqa", "q_a_proj")
"""Large 3's compressed-tensors ``ignore`` regexes beside the router's (``re:.*<leaf>$``)."""
_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


class NativeLayout:
    """A checkpoint in Mistral's native layout that holds no tensor yet: what a plugin's ``state_dict_adapter``
    is asked with to name each model tensor's native key. Its one listed key is how adapters detect the
    layout; no key is stored (``in`` is always false), so nothing is ever read from it."""

    LAYOUT_KEYS = ("tok_embeddings.weight",)

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config_path = directory / "params.json"
        self.location = None

    def keys(self) -> list[str]:
        return list(self.LAYOUT_KEYS)

    def __contains__(self, key: object) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def check_native_adapter(adapter: StateDictAdapter, config: Any, plugin: str | None) -> None:
    """The adapter a plugin gave for :class:`NativeLayout` must map into the native layout."""
    layout = adapter.describe().get("layout")
    if layout != "native":
        raise NoNativeLayoutError(
            f"model type {getattr(config, 'model_type', None)!r} (plugin {plugin!r}) has no Mistral-native form: "
            f"its adapter maps to the {layout!r} layout; write it with --layout hf"
        )


def native_quantization(save_format: SaveFormat, *, mla: bool, vlm: bool) -> dict[str, Any]:
    """The ``params.json`` field declaring what ``save_format`` writes (``{}`` for ``"none"``)."""
    if save_format.modules_to_not_convert is not None:
        raise SaveOptionError(
            "modules_to_not_convert (--not-convert) does not apply to the native layout: Mistral's native "
            "quantization fixes the modules kept unquantized (embeddings, head, vision, router)"
        )
    if save_format.quantization == "none":
        return {}
    if save_format.quantization == "fp8-tensor":
        return {"quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "NO_SCALES"}}
    if save_format.quantization != "fp8-block":
        raise SaveOptionError(
            f"the native layout is written as bf16, fp8-tensor or fp8-block, not {save_format.quantization!r}"
        )
    rows, columns = save_format.block_size
    ignore = ["model.embed_tokens"]
    if vlm:
        ignore += ["re:patch_merger.*", "re:vision_encoder.*", "re:vision_language_adapter.*"]
    if mla:
        ignore += [f"re:.*{leaf}$" for leaf in (*_BLOCK_IGNORED_LEAVES, _ROUTER)]
    ignore.append("lm_head")
    float8 = {"num_bits": 8, "symmetric": True, "type": "float", "actorder": None, "observer_kwargs": {}}
    group = {
        "format": "float-quantized",
        "input_activations": {
            **float8,
            "block_structure": None,
            "dynamic": True,
            "group_size": columns,
            "observer": None,
            "strategy": "group",
        },
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {
            **float8,
            "block_structure": [rows, columns],
            "dynamic": False,
            "group_size": None,
            "observer": "static_minmax",
            "strategy": "block",
        },
    }
    config = {
        "config_groups": {"FP8_BLOCK": {k: _sorted(v) for k, v in sorted(group.items())}},
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }
    return {"quantization_config": config}


def _sorted(value: Any) -> Any:
    return dict(sorted(value.items())) if isinstance(value, dict) else value


def native_params_bytes(config: Any, save_format: SaveFormat, *, source_params: Path | None) -> bytes:
    """The ``params.json`` to write: the source's own (a native source: every field kept as published) or the
    one ``config`` translates back to, its quantization replaced by what ``save_format`` writes."""
    text = config.get_text_config()
    quantization = native_quantization(
        save_format,
        mla=getattr(text, "model_type", None) == "mistral4",
        vlm=getattr(config, "model_type", None) == "mistral3",
    )
    if source_params is not None:
        params = json.loads(source_params.read_text(encoding="utf-8"))
    else:
        params = params_from_config(config)
    for field in _QUANTIZED_FIELDS:
        params.pop(field, None)
    params.update(quantization)
    return (json.dumps(params, indent=2, sort_keys=source_params is None) + "\n").encode()


def plan_native(
    tensors: Mapping[str, ModelTensor],
    target: StateDictAdapter,
    save_format: SaveFormat,
    *,
    source: SourceView | None,
    text_prefix: str,
    mla: bool,
) -> SavePlan:
    """Plan writing ``tensors`` (their dtype, or FP8 per ``save_format``) under the native keys ``target``
    maps them to, a tensor assembled from pieces split back into them (each piece's box in its stored
    orientation: rows in rotary order, one expert's matrix)."""
    scale_name, scale_dtype = _BLOCK_SCALE if save_format.block_size is not None else _TENSOR_SCALE
    planned: list[PlannedWrite] = []
    for name, tensor in tensors.items():
        where = target.from_hf(name)
        fp8 = save_format.is_fp8_format and _quantized(name, tensor, save_format, text_prefix, mla)
        assembled = where.is_assembled
        for piece in where.parts():
            geometry = None
            shape: tuple[int, ...] | None = tensor.shape
            if assembled:
                geometry = PieceGeometry.of(piece, tensor.shape, _stored_ndim(piece, tensor.shape))
                shape = geometry.stored_shape
            if shape is None:
                raise NoNativeLayoutError(
                    f"piece {piece.key!r} of {name!r} has no stored shape in the native form"
                )
            scale = None
            if fp8:
                block = save_format.block_size
                kept = _source_scale(name, piece, tensor, shape, block, source)
                scale = PlannedScale(
                    piece.key.removesuffix("weight") + scale_name,
                    source.checkpoint.info(kept[0]).dtype if kept else scale_dtype,  # kept exactly
                    () if block is None else grid_shape(shape, block),
                    block,
                    kept[0] if kept else None,
                    kept[1] if kept else None,
                )
            entry = PlannedWrite(
                piece.key if assembled else name,
                piece.key,
                torch.float8_e4m3fn if fp8 else tensor.dtype,
                tuple(shape),
                scale=scale,
                piece_of=name if assembled else None,
                geometry=geometry,
            )
            planned.append(entry)
    plan = SavePlan(save_format, planned, None)
    plan.partial_blocks = partial_blocks(plan)
    return plan


def _stored_ndim(piece: Piece, shape: tuple[int, ...]) -> int:
    """A piece's stored rank: its box less the leading size-1 dims (one expert's ``[1, I, H]`` -> 2-D)."""
    box = piece.box_in(shape)
    dims = len(box)
    while dims > 2 and box[len(box) - dims][1] - box[len(box) - dims][0] == 1:
        dims -= 1
    return dims


def _quantized(name: str, tensor: ModelTensor, save_format: SaveFormat, text_prefix: str, mla: bool) -> bool:
    """A linear weight of the text stack or a fused experts tensor, less the router (and, in blocks for MLA,
    Large 3's BF16 ``q_a_proj`` / ``kv_a_proj_with_mqa``)."""
    if not name.startswith(text_prefix + "layers."):
        return False
    if _EXPERTS.search(name):
        return True
    if tensor.linear is None or len(tensor.shape) != 2:
        return False
    leaf = tensor.linear.rpartition(".")[2]
    if leaf == _ROUTER:
        return False
    return not (save_format.block_size is not None and mla and leaf in _BLOCK_IGNORED_LEAVES)


def _source_scale(
    name: str,
    piece: Piece,
    tensor: ModelTensor,
    stored: tuple[int, ...],
    block: tuple[int, int] | None,
    source: SourceView | None,
) -> tuple[str, tuple[int, ...] | None] | None:
    """The source scale a piece may keep (its key, and the index of the piece's own scale within it), where the
    source stored the same values as E4M3 at this granularity:

    * a source piece filling the same box with the same stored shape (a native source's own key; a per-expert
      HF source's expert matrix): per tensor always, in blocks only in the same row order (no rotary
      permutation between them), since a block grid is laid over stored coordinates;
    * per tensor, one expert's matrix of a fused source tensor with one scale per expert (``[E, 1, 1]``,
      Mistral Small 4's form): that expert's scale.
    """
    if source is None:
        return None
    checkpoint = source.checkpoint
    box = piece.box_in(tensor.shape)
    for part in source.adapter.from_hf(name).parts():
        if not part.is_fp8:
            continue
        info = checkpoint.info(part.key)
        if info.dtype != torch.float8_e4m3fn:
            continue
        scale = tuple(checkpoint.info(part.scale_key).shape)
        if part.block_size == block and part.box_in(tensor.shape) == box and tuple(info.shape) == stored:
            same_order = part.rope_heads == piece.rope_heads and part.transposed == piece.transposed
            if (block is None and math.prod(scale) == 1) or (block is not None and same_order):
                return part.scale_key, None
        expert = _one_expert(box, tensor.shape)
        per_matrix = part.block_size is None or (
            part.block_size[0] >= tensor.shape[-2] and part.block_size[1] >= tensor.shape[-1]
        )
        whole = part.box is None and tuple(info.shape) == tensor.shape
        if (
            block is None
            and whole
            and per_matrix
            and expert is not None
            and scale in ((tensor.shape[0], 1, 1), (tensor.shape[0],))
        ):
            return part.scale_key, (expert,)
    return None


def _one_expert(box: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> int | None:
    """The index along dim 0 of a box of a 3-D tensor that spans one index there."""
    if len(shape) != 3 or box[0][1] - box[0][0] != 1:
        return None
    return box[0][0]
