"""Implements no claim_config: it is never asked to serve a config."""

from automodel_plugins import hookimpl


@hookimpl
def post_materialize(model, config):
    model.calls.append("no_claim")
