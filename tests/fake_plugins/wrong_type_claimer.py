"""A claim_config returning a dict instead of a Claim."""

from automodel_plugins import hookimpl


@hookimpl
def claim_config(config):
    return {"reason": "dicts are not claims"}
