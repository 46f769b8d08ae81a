"""Auto-class doors: code written for transformers changes one import.

``automodel_plugins.AutoModelForImageTextToText.from_pretrained(path_or_repo, **kwargs)`` asks the registry
first: a config a plugin claims is loaded by :func:`~automodel_plugins.pipeline.load.from_pretrained` (the
plugin's streaming load onto the stock class, transformers' options as ``docs/loading-options.md`` says),
and any other goes to transformers' class of the same name, which returns what it always does. The class a
door gives is the one transformers' Auto class gives for the config: ``AutoModel`` the base model (of the
plugin's load), ``AutoModelForCausalLM`` on a vision-language config the ``ValueError`` transformers raises.

``from_config`` delegates to transformers (a freshly initialized model) and, where a plugin claims the config
and the class is the one the plugin serves, runs its ``post_materialize`` and binds its forward override, as
:func:`~automodel_plugins.pipeline.load.build_model` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from automodel_plugins.registry import Registry

__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"]


class _AutoDoor:
    """One transformers Auto class, routed through the registry (subclasses name which)."""

    stock_name: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` or "
            f"`{type(self).__name__}.from_config(config)` methods."
        )

    @classmethod
    def stock(cls) -> type:
        """transformers' Auto class of the same name."""
        import transformers

        return getattr(transformers, cls.stock_name)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
        """The claimed checkpoint through its plugin, else transformers' ``from_pretrained`` of this class.

        ``kwargs`` are transformers' options and :func:`~automodel_plugins.pipeline.load.from_pretrained`'s
        own (``dequantize``, ``skip_logits``, ``registry``, ...).
        """
        from automodel_plugins.errors import LoadOptionError
        from automodel_plugins.pipeline.load.load import from_pretrained

        if model_args:
            raise LoadOptionError(
                "model_args",
                f"{len(model_args)} positional argument(s) after the path: pass options by keyword "
                "(transformers would hand positional ones to the model's __init__)",
            )
        return from_pretrained(pretrained_model_name_or_path, auto_class=cls.stock(), **kwargs)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        skip_logits: bool = False,
        registry: Registry | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """transformers' ``from_config`` (random weights), composed with the claiming plugin's
        ``post_materialize`` and forward override where the class is the one it serves."""
        from automodel_plugins.model.forward import SKIP_LOGITS_OPTION
        from automodel_plugins.model.stock import stock_class
        from automodel_plugins.pipeline.composition import (
            COMPOSITION_ATTR,
            Composition,
            bind_forward,
            compose,
        )
        from automodel_plugins.registry import get_registry

        registry = registry or get_registry()
        model = cls.stock().from_config(config, **kwargs)
        claim = registry.winning_claim(model.config)
        if claim is None or type(model) is not stock_class(model.config):
            reason = (
                "no plugin claimed the config" if claim is None else f"{type(model).__name__} is not served"
            )
            setattr(
                model, COMPOSITION_ATTR, Composition(plugin=None, claim_reason=f"{reason}: stock from_config")
            )
            return model
        composition = compose(registry, claim, **{SKIP_LOGITS_OPTION: skip_logits}, dequantize=True)
        registry.call(claim.plugin, "post_materialize", model=model, config=model.config)
        bind_forward(registry, claim.plugin, model, model.config, composition)
        setattr(model, COMPOSITION_ATTR, composition)
        return model


class AutoModelForImageTextToText(_AutoDoor):
    """``transformers.AutoModelForImageTextToText``, through the registry (vision-language models)."""

    stock_name = "AutoModelForImageTextToText"


class AutoModelForCausalLM(_AutoDoor):
    """``transformers.AutoModelForCausalLM``, through the registry (text-only models)."""

    stock_name = "AutoModelForCausalLM"


class AutoModel(_AutoDoor):
    """``transformers.AutoModel``, through the registry: the base model (no head)."""

    stock_name = "AutoModel"
