"""Claims every config at the default priority 0: a fallback that loses to any specific claim."""

from automodel_plugins import Claim, hookimpl


@hookimpl
def claim_config(config):
    return Claim(reason="generic fallback")


@hookimpl
def post_materialize(model, config):
    model.calls.append("generic_claimer")
