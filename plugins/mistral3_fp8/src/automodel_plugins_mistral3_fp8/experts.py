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
import re
from typing import Any

from automodel_plugins import Fp8StateDictAdapter, StateDictAdapter, TensorSource, stacked_boxes
from automodel_plugins.errors import CheckpointError

PER_EXPERT, FUSED = "per-expert", "fused"
EXPERTS = ".mlp.experts."
PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Fused runtime parameter -> the per-expert projections stacked into it, in order along its dim 1."""
_PER_EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_FUSED_KEY = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")


@dataclasses.dataclass(frozen=True)
class ExpertShapes:
    """The runtime shapes of one layer's expert parameters, from the ``mistral4`` text config."""

    experts: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, config: Any) -> ExpertShapes:
        text = config.get_text_config()
        return cls(text.n_routed_experts, text.hidden_size, text.moe_intermediate_size)

    def runtime(self, parameter: str) -> tuple[int, int, int]:
        e, h, i = self.experts, self.hidden, self.intermediate
        return (e, 2 * i, h) if parameter == "gate_up_proj" else (e, h, i)

    @property
    def whole_matrix_block(self) -> tuple[int, int]:
        """A block size one block of which covers every expert matrix of both fused tensors: the block grid
        of one scale per expert is then ``[E, 1, 1]``."""
        side = max(2 * self.intermediate, self.hidden)
        return side, side


def detect_form(keys: list[str], *, where: object = None) -> str | None:
    """``per-expert`` or ``fused`` from the checkpoint's keys; ``None`` when it holds no expert tensor. A
    checkpoint mixing both is refused."""
    per_expert = next((key for key in keys if _PER_EXPERT_KEY.search(key)), None)
    fused = next((key for key in keys if _FUSED_KEY.search(key)), None)
    if per_expert and fused:
        raise CheckpointError(
            f"checkpoint mixes per-expert ({per_expert!r}) and fused ({fused!r}) expert tensors", path=where
        )
    return PER_EXPERT if per_expert else FUSED if fused else None


class Mistral4ExpertsAdapter(StateDictAdapter):
    """``inner`` (the layout's renames, FP8 scales) for every tensor; the experts' fused parameters read in
    the checkpoint's ``form``."""

    def __init__(self, inner: Fp8StateDictAdapter, form: str | None, shapes: ExpertShapes) -> None:
        self.inner = inner
        self.form = form
        self.shapes = shapes

    def from_hf(self, name: str) -> TensorSource:
        layer, _, parameter = name.rpartition(EXPERTS)
        if not layer or parameter not in PROJECTIONS or self.form is None:
            return self.inner.from_hf(name)
        if self.form == FUSED:
            return self._fused(name, parameter)
        projections = PROJECTIONS[parameter]
        boxes = stacked_boxes(self.shapes.runtime(parameter), len(projections))
        layer_key = self.inner.to_hf(layer)
        pieces = (
            (f"{layer_key}{EXPERTS}{expert}.{projection}.weight", box)
            for expert, row in enumerate(boxes)
            for projection, box in zip(projections, row, strict=True)
        )
        return self.inner.assembled(name, pieces)

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

    def to_hf(self, name: str) -> str:
        return self.inner.to_hf(name)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "adapter": type(self).__name__, "experts": self.form}
