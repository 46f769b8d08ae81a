"""Claims Llama configs and repairs their rotary buffers; no adapter, so the host's default FP8 adapter (which
reads ``quantization_config``) serves it."""

from automodel_plugins import Claim, hookimpl
from automodel_plugins.model.rotary import repair_rotary


@hookimpl
def claim_config(config):
    return Claim(reason="a llama") if config.model_type == "llama" else None


@hookimpl
def post_materialize(model, config):
    repair_rotary(model)
