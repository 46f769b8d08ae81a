"""A wrapper hookimpl: meaningless when the host calls hooks one plugin at a time."""

from automodel_plugins import hookimpl


@hookimpl(wrapper=True)
def claim_config(config):
    return (yield)
