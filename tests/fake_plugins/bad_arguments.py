"""A claim_config taking an argument the spec does not have: pluggy refuses it at register()."""

from automodel_plugins import hookimpl


@hookimpl
def claim_config(config, device):
    return None
