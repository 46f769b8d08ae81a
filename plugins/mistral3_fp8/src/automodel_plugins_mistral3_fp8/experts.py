"""Where a Mistral 4 MoE layer's experts are in an HF-form checkpoint, and the adapter that reads them into
transformers' fused ``Mistral4Experts`` parameters (``gate_up_proj [E, 2I, H]``, gate rows then up, and
``down_proj [E, H, I]``).

Two on-disk forms, told apart by the checkpoint's keys:

* ``fused`` (Mistral Small 4's HF form, and what ``save_pretrained`` writes): the runtime tensors, one to one.
  FP8 ones carry either one block grid per expert (``gate_up_proj_scale_inv [E, ceil(2I/b), ceil(H/b)]``,
  fine-grained FP8) or **one scale per expert** (``[E, 1, 1]``, per-tensor FP8: gate and up rescaled to a
  common scale before fusing). The latter is read as a stacked block grid whose one block covers a whole
  expert matrix: each element times its expert's scale in fp32, exactly the per-tensor product, and the
  experts can then stay FP8 (``dequantize=False``) in the host's :class:`~automodel_plugins.Fp8Experts`.
* ``per-expert`` (fine-tunes saved by other tools, block FP8): ``mlp.experts.{e}.{gate,up,down}_proj.weight``
  with their own scales, assembled into the fused tensors (the host's many-to-one contract).
"""

from __future__ import annotations

import dataclasses

from automodel_plugins import TensorSource
from automodel_plugins.adapters.experts import (
    EXPERTS,
    FUSED_KEY,
    PER_EXPERT_KEY,
    PROJECTIONS,
    FusedExpertsAdapter,
    per_expert_pieces,
)
from automodel_plugins.errors import CheckpointError

PER_EXPERT, FUSED = "per-expert", "fused"
EXPERTS_FIELD = "n_routed_experts"
"""The ``mistral4`` text config's expert count (:meth:`ExpertShapes.of`)."""


def detect_form(keys: list[str], *, where: object = None) -> str | None:
    """``per-expert`` or ``fused`` from the checkpoint's keys; ``None`` when it holds no expert tensor. A
    checkpoint mixing both is refused."""
    per_expert = next((key for key in keys if PER_EXPERT_KEY.search(key)), None)
    fused = next((key for key in keys if FUSED_KEY.search(key)), None)
    if per_expert and fused:
        raise CheckpointError(
            f"checkpoint mixes per-expert ({per_expert!r}) and fused ({fused!r}) expert tensors", path=where
        )
    return PER_EXPERT if per_expert else FUSED if fused else None


class Mistral4ExpertsAdapter(FusedExpertsAdapter):
    """``inner`` (the layout's renames, FP8 scales) for every tensor; the experts' fused parameters read in
    the checkpoint's ``form``."""

    def from_hf(self, name: str) -> TensorSource:
        layer, _, parameter = name.rpartition(EXPERTS)
        if not layer or parameter not in PROJECTIONS or self.form is None:
            return self.inner.from_hf(name)
        if self.form == FUSED:
            return self._fused(name, parameter)
        return self.inner.assembled(name, per_expert_pieces(self.inner.to_hf(layer), parameter, self.shapes))

    def _fused(self, name: str, parameter: str) -> TensorSource:
        """The fused tensor one to one; a per-tensor FP8 one whose scale holds one value per expert
        (``[E, 1, 1]``) as a stacked grid of whole-matrix blocks. A scale of any other shape is left to the
        host's checks, which name it."""
        source = self.inner.from_hf(name)
        if source.scale_key is None or source.block_size is not None:
            return source
        scale = self.inner.checkpoint.info(source.scale_key)
        if tuple(scale.shape) != (self.shapes.experts, 1, 1):
            return source
        return dataclasses.replace(source, block_size=self.shapes.whole_matrix_block)
