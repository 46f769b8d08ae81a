"""Claims Mistral3 configs with a ministral3 text backbone at priority 10; implements post_materialize too."""

from automodel_plugins import Claim, hookimpl


@hookimpl
def claim_config(config):
    text = getattr(config, "text_config", None)
    if config.model_type == "mistral3" and getattr(text, "model_type", None) == "ministral3":
        return Claim(reason="Mistral3 with a ministral3 text backbone", priority=10)
    return None


@hookimpl
def post_materialize(model, config):
    model.calls.append("mistral3_claimer")
