"""Claims every config at priority 10: ties with mistral3_claimer on a Mistral3 config."""

from automodel_plugins import Claim, hookimpl


@hookimpl
def claim_config(config):
    return Claim(reason="claims everything", priority=10)
