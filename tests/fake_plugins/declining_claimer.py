"""Claims nothing; declines every Llama config with a reason, and answers ``None`` for anything else."""

from automodel_plugins import Decline, hookimpl


@hookimpl
def claim_config(config):
    if config.model_type == "llama":
        return Decline(reason="llama is served by stock transformers")
    return None
