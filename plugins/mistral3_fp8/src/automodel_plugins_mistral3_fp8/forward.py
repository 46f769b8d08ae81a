"""The Mistral3 forward override: the host's fused-loss forward over the stock ``Mistral3ForConditionalGeneration``.

The text vocabulary lives on ``config.text_config``; everything else (vision tower, image-token scatter, cache)
stays the stock base model's job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automodel_plugins.forward import fused_loss_forward


def mistral3_forward(model: Any, config: Any) -> Callable[..., Any]:
    """The function to bind as ``model.forward``: stock outputs, fused loss, logits skippable when labelled."""
    return fused_loss_forward(type(model).forward, vocab_size=config.text_config.vocab_size)
