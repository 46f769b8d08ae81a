"""A claim_config that raises: must surface as an error, never as a silent "no"."""

from automodel_plugins import hookimpl


@hookimpl
def claim_config(config):
    raise RuntimeError("boom while reading the config")


@hookimpl
def forward_override(model, config):
    raise ValueError("no forward for you")
