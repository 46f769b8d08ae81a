"""The stock transformers class of a config, and that class built on the meta device.

The host never subclasses or patches a model class: every load starts from the class the config names
(``architectures``), else the auto class for its type, built with every tensor on ``meta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from automodel_plugins.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["build_on_meta", "stock_class"]


def stock_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class ``config.architectures`` names, else the image-text-to-text or causal-LM auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ConfigError(
        None, f"no transformers class for model_type {config.model_type!r} (config.architectures is empty)"
    )


def build_on_meta(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The stock class of ``config`` with every tensor on meta: nothing allocated, nothing initialized."""
    model_class = stock_class(config)
    with torch.device("meta"):
        return model_class._from_config(config, dtype=dtype)
