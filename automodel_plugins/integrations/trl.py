"""TRL's ``SFTTrainer`` with this project's fused loss (imports ``trl``; install it yourself: ``pip install trl``).

TRL 1.x's ``SFTTrainer`` calls ``trl.trainer.utils.add_fused_lm_head`` on the model at init, which rebinds
``model.forward`` on the instance, and its ``compute_loss`` trains through ``model(**batch, fused_lm_head=True)``:
the base model, then TRL's own chunked log-prob head over ``lm_head.weight``. The forward override bound by this
project (and so its fused linear cross-entropy and ``skip_logits``) then never runs in training. TRL's head does
not materialize ``[tokens, vocab]`` logits either, so the memory saving on the loss holds with stock TRL; what
TRL's head gives up next to this project's is its own choice of chunking and the fp32 accumulation rules
described in ``docs/fused-loss.md``.

:class:`FusedLossSFTMixin` puts this project's loss back: ``compute_loss`` is ``transformers.Trainer``'s
(``model(**batch, labels=..., num_items_in_batch=...)``, gradient accumulation and ``average_tokens_across_devices``
handled as ``Trainer`` handles them), with ``skip_logits=True`` so no ``[B, S, V]`` logits are built. TRL's
rebound forward passes a call without ``fused_lm_head`` straight to the forward it wrapped, which is this
project's. What TRL's loss path adds and this one does not: its ``entropy`` and ``mean_token_accuracy`` metrics
(they need per-token outputs), ``loss_type="dft"``, label smoothing and ``compute_loss_func`` (refused here, with
the reason). Use :class:`SFTTrainer` as a drop-in for ``trl.SFTTrainer``, or mix the mixin into your own
subclass. See ``docs/ecosystem.md``.
"""

from __future__ import annotations

from typing import Any

import trl
from transformers import Trainer

from automodel_plugins.errors import TrainerOptionError
from automodel_plugins.model.forward import SKIP_LOGITS_OPTION

__all__ = ["FusedLossSFTMixin", "SFTTrainer"]


class FusedLossSFTMixin:
    """Mix in before ``trl.SFTTrainer``: training and evaluation losses come from the model's own labelled forward
    (this project's fused linear cross-entropy) instead of TRL's chunked head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        args_ = self.args
        refused = [
            reason
            for reason, on in (
                ("loss_type='dft' (weights each token by its probability)", args_.loss_type != "nll"),
                ("label_smoothing_factor > 0 (needs full logits)", args_.label_smoothing_factor > 0),
                ("compute_loss_func (receives the logits)", self.compute_loss_func is not None),
            )
            if on
        ]
        if refused:
            raise TrainerOptionError(
                f"{type(self).__name__} computes the loss with the model's fused linear cross-entropy, which does not "
                f"implement {', '.join(refused)}: use trl.SFTTrainer for that"
            )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``transformers.Trainer.compute_loss`` on ``model(**inputs, skip_logits=True)``; TRL's ``use_cache=False``
        and MoE router request kept."""
        inputs = {**inputs, "use_cache": False, SKIP_LOGITS_OPTION: not return_outputs}
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


class SFTTrainer(FusedLossSFTMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is this project's fused linear cross-entropy (see the module docstring)."""
