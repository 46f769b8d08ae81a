"""Implements ``claim_confg`` (sic): a hook pluggy would silently ignore without check_pending."""

from automodel_plugins import Claim, hookimpl


@hookimpl
def claim_confg(config):
    return Claim(reason="never asked")


@hookimpl
def post_materialize(model, config):
    model.calls.append("misspelled_hook")
