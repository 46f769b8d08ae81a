"""Two-stage pipeline split of the tiny Mistral3 model, and the placements of a tensor-parallel layout.

A stage keeps the module tree's names (so checkpoint keys still map): layers of the other stage become
:class:`OtherStage` pass-throughs, modules it does not hold become ``None``. A stage then runs its own
sub-modules; the outer ``Mistral3ForConditionalGeneration.forward`` never runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OtherStage(nn.Module):
    """A decoder layer held by another stage: hands the hidden states through untouched."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def split_point(model: nn.Module) -> int:
    return len(model.model.language_model.layers) // 2


def make_stage(model: nn.Module, stage: int) -> nn.Module:
    """Stage 0: vision tower, projector, embeddings, first half of the layers. Stage 1: the rest, norm, head.

    Both stages keep the text rotary module (each runs decoder layers).
    """
    text = model.model.language_model
    split = split_point(model)
    mine = range(split) if stage == 0 else range(split, len(text.layers))
    for index in range(len(text.layers)):
        if index not in mine:
            text.layers[index] = OtherStage()
    if stage == 0:
        text.norm = nn.Identity()
        model.lm_head = None
    else:
        model.model.vision_tower = None
        model.model.multi_modal_projector = None
        text.embed_tokens = None
    return model


@torch.no_grad()
def run_stage0(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embeddings, image features scattered into the image tokens, then this stage's decoder layers."""
    base = model.model
    ids = batch["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    image = base.get_image_features(
        pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
    )
    features = torch.cat(image.pooler_output, dim=0).to(embeds.device, embeds.dtype)
    mask = base.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    embeds = embeds.masked_scatter(mask, features)
    return base.language_model(inputs_embeds=embeds).last_hidden_state


@torch.no_grad()
def run_stage1(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """This stage's decoder layers, the final norm and the head: the logits."""
    out = model.model.language_model(inputs_embeds=hidden).last_hidden_state
    return model.lm_head(out)


@torch.no_grad()
def reference_split(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model's hidden state after the last layer of stage 0, and its logits."""
    captured: dict[str, torch.Tensor] = {}
    layer = model.model.language_model.layers[split_point(model) - 1]
    handle = layer.register_forward_hook(lambda _m, _a, out: captured.setdefault("hidden", out))
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        handle.remove()
    return captured["hidden"], logits


# --- tensor parallelism ------------------------------------------------------------------------------------

_COLUMNWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWWISE = ("o_proj", "down_proj")


def tp_placement(name: str) -> Any:
    """Projections sharded (even layers: column-wise Shard(0) in, row-wise Shard(1) out; odd layers the
    other way round, for uneven, block-unaligned shards of FP8 weights); embeddings and head Shard(0) over
    the odd vocabulary; everything else Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    swapped = "layers" in parts and int(parts[parts.index("layers") + 1]) % 2 == 1
    if name.startswith("model.language_model.") and module in _COLUMNWISE + _ROWWISE:
        rowwise = module in _ROWWISE
        return Shard(0 if rowwise == swapped else 1)
    if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        return Shard(0)
    return Replicate()


def distribute_parameters(model: nn.Module, mesh: Any) -> None:
    """Turn every parameter into a DTensor placed by :func:`tp_placement` (tied parameters stay tied)."""
    from torch.distributed.tensor import distribute_tensor

    done: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if id(param) not in done:
            value = distribute_tensor(param.detach(), mesh, [tp_placement(name)])
            done[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = done[id(param)]
