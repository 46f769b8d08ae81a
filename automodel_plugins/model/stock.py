"""The stock transformers class of a config, and that class built on the meta device.

The host never subclasses or patches a model class: every load starts from the class the config names
(``architectures``), else the auto class for its type, built with every tensor on ``meta``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.errors import ConfigError, LoadOptionError
from automodel_plugins.sources import config_path_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["auto_target", "build_on_meta", "stock_class"]


def stock_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class ``config.architectures`` names, else the image-text-to-text or causal-LM auto class.

    A name transformers does not know (a remote-code class) is passed over; one of another model's classes
    (``LlamaForCausalLM`` in a ``mistral3`` config) is a :class:`ConfigError` naming the field, since building
    it from this config fails inside its ``__init__``.
    """
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if not isinstance(cls, type):
            continue
        expected = getattr(cls, "config_class", None)
        if isinstance(expected, type) and not isinstance(config, expected):
            raise ConfigError(
                config_path_of(config),
                f"architectures names {name}, a class for model_type "
                f"{getattr(expected, 'model_type', '?')!r} configs, but model_type is {config.model_type!r}",
            )
        return cls
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ConfigError(
        config_path_of(config),
        f"no transformers class for model_type {config.model_type!r} (config.architectures is empty)",
    )


def auto_target(auto_class: type, config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class transformers' ``auto_class`` (``AutoModelForCausalLM``, ...) loads ``config`` as; a config it
    does not serve is the error transformers raises (a ``ValueError``), as a :class:`ConfigError`."""
    from transformers.models.auto.auto_factory import _get_model_class

    mapping = auto_class._model_mapping
    if type(config) not in mapping:
        raise ConfigError(
            config_path_of(config),
            f"Unrecognized configuration class {type(config)} for this kind of AutoModel: {auto_class.__name__} "
            f"(transformers' {auto_class.__name__} does not load {config.model_type!r} configs either)",
        )
    return _get_model_class(config, mapping)


def build_on_meta(config: PretrainedConfig, dtype: torch.dtype, **build: Any) -> PreTrainedModel:
    """The stock class of ``config`` with every tensor on meta: nothing allocated, nothing initialized.

    ``build`` holds transformers' construction options (``attn_implementation``, ``experts_implementation``),
    given to the class as its ``from_pretrained`` gives them; one the class refuses (an implementation that is
    not installed or that it does not support) is a :class:`LoadOptionError` with transformers' reason. A config
    the class cannot be built from (what :func:`~automodel_plugins.sources.load_config` does not already
    refuse) raises :class:`ConfigError` naming the config file and the class, not the exception from deep
    inside its ``__init__``.
    """
    model_class = stock_class(config)
    pristine = copy.deepcopy(config) if build else None  # construction sets the options on the config
    try:
        with torch.device("meta"):
            return model_class._from_config(config, dtype=dtype, **build)
    except Exception as exc:
        if pristine is not None and _builds(model_class, pristine, dtype):
            option = next(iter(build)) if len(build) == 1 else " / ".join(build)
            raise LoadOptionError(
                option, f"{model_class.__name__} refuses {build}: {type(exc).__name__}: {exc}"
            ) from exc
        raise ConfigError(
            config_path_of(config),
            f"transformers cannot build {model_class.__name__} from this config: {type(exc).__name__}: {exc}",
        ) from exc


def _builds(model_class: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype) -> bool:
    """Whether the class builds from ``config`` without the construction options (so those were at fault)."""
    try:
        with torch.device("meta"):
            model_class._from_config(config, dtype=dtype)
    except Exception:
        return False
    return True
