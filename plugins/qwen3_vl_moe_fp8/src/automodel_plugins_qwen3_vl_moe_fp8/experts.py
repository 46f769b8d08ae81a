"""Where a Qwen3-VL-MoE layer's experts are in a checkpoint: three on-disk forms, told apart by the keys and
shapes, and the many-to-one adapter that reads each into transformers 5's fused expert parameters.

At runtime (transformers 5.x) a MoE layer holds ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first, then
up) and ``mlp.experts.down_proj [E, H, I]``. On disk:

* ``per-expert`` (the FP8 releases, ``Qwen/Qwen3-VL-*-A*B-Instruct-FP8``): one 2-D tensor per expert and
  projection, ``mlp.experts.{e}.{gate,up,down}_proj.weight``, each with its own ``weight_scale_inv`` grid.
  ``gate_up_proj`` is assembled from ``2E`` pieces, ``down_proj`` from ``E``.
* ``fused-transposed`` (the BF16 releases, and what transformers' ``save_pretrained`` writes): the fused
  tensors in the older orientation, ``[E, H, 2I]`` and ``[E, I, H]``: one piece each, stored transposed.
* ``fused-runtime``: the fused tensors as the module holds them (FP8 ones with one grid per expert,
  ``gate_up_proj_scale_inv [E, ceil(2I/b), ceil(H/b)]``, as transformers' ``FP8Experts`` holds them): one to one.

The orientation of a fused checkpoint is read from both tensors' shapes: ``gate_up_proj`` alone cannot tell
``[E, H, 2I]`` from ``[E, 2I, H]`` when ``H == 2I``, but then ``down_proj`` (``H != I``) can.
"""

from __future__ import annotations

from operator import methodcaller
from typing import Any

from automodel_plugins import TensorSource
from automodel_plugins.adapters.experts import (
    EXPERTS,
    FUSED_KEY,
    PER_EXPERT_KEY,
    PROJECTIONS,
    ExpertShapes,
    FusedExpertsAdapter,
    per_expert_pieces,
)
from automodel_plugins.errors import CheckpointError

PER_EXPERT, FUSED_TRANSPOSED, FUSED_RUNTIME = "per-expert", "fused-transposed", "fused-runtime"
EXPERTS_FIELD = "num_experts"
"""The Qwen3-VL-MoE text config's expert count (:meth:`ExpertShapes.of`)."""


def detect_form(checkpoint: Any, shapes: ExpertShapes) -> str | None:
    """The experts' on-disk form, from the checkpoint's keys (and, for fused tensors, their shapes); ``None``
    when it holds no expert tensor (no MoE layer). A checkpoint mixing forms is refused."""
    keys = list(checkpoint.keys())
    per_expert = next((key for key in keys if PER_EXPERT_KEY.search(key)), None)
    fused = [
        key for key in filter(methodcaller("endswith", "_proj"), keys) if FUSED_KEY.search(key)
    ]  # C filter
    if per_expert and fused:
        raise CheckpointError(
            f"checkpoint mixes per-expert ({per_expert!r}) and fused ({fused[0]!r}) expert tensors",
            path=checkpoint.directory,
        )
    if per_expert:
        return PER_EXPERT
    if not fused:
        return None
    return _fused_orientation(checkpoint, fused, shapes)


def _fused_orientation(checkpoint: Any, fused: list[str], shapes: ExpertShapes) -> str:
    """Runtime or transposed, by the shapes of one layer's fused tensors (both when one cannot tell)."""
    layer = fused[0].rsplit(EXPERTS, 1)[0]
    votes = set()
    for parameter in PROJECTIONS:
        key = f"{layer}{EXPERTS}{parameter}"
        if key not in checkpoint:
            continue
        stored = tuple(checkpoint.info(key).shape)
        runtime = shapes.runtime(parameter)
        forms = {FUSED_RUNTIME} if stored == runtime else set()
        if stored == (runtime[0], runtime[2], runtime[1]):
            forms.add(FUSED_TRANSPOSED)
        if not forms:
            raise CheckpointError(
                f"fused expert tensor of shape {stored} fits neither {runtime} nor its transpose (config: "
                f"{shapes.experts} experts, hidden {shapes.hidden}, moe_intermediate_size {shapes.intermediate})",
                path=checkpoint.info(key).file,
                key=key,
            )
        votes.add(frozenset(forms))
    decided = frozenset.intersection(*votes) if votes else frozenset()
    if len(decided) != 1:
        raise CheckpointError(
            f"cannot tell whether the fused expert tensors of {layer} are stored transposed",
            path=checkpoint.directory,
        )
    return next(iter(decided))


class ExpertsAdapter(FusedExpertsAdapter):
    """``inner`` (runtime names, FP8 scales) for every tensor, except the expert parameters of MoE layers,
    which are read in the checkpoint's ``form``."""

    def from_hf(self, name: str) -> TensorSource:
        layer, _, parameter = name.rpartition(EXPERTS)
        if not layer or parameter not in PROJECTIONS or self.form in (None, FUSED_RUNTIME):
            return self.inner.from_hf(name)
        if self.form == FUSED_TRANSPOSED:
            return self.inner.assembled(name, [(self.inner.to_hf(name), None)], transposed=True)
        return self.inner.assembled(name, per_expert_pieces(self.inner.to_hf(layer), parameter, self.shapes))
