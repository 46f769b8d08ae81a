"""FSDP2 with the user's own loader, then ``torch.compile``: the rotary buffers are right from ``to_empty`` on,
before any forward, and the first compiled call neither breaks in the rotary repair nor differs from one
process's load.

build on meta -> ``fully_shard`` every decoder layer and the root -> ``to_empty`` -> ``set_model_state_dict``
(not ``load_weights``: no ``post_materialize`` once the buffers are real) -> first call compiled.
"""

from __future__ import annotations

from typing import Any

import torch

import automodel_plugins
from distributed import _checks, _tiny


def fsdp_rotary_compile(ctx: Any) -> dict[str, Any]:
    from torch._dynamo.backends.debugging import ExplainWithBackend
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    path = ctx.checkpoint(_tiny.TEXT_ONLY)
    reference = _tiny.reference(path)
    model = automodel_plugins.build_model(path)
    for layer in model.model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    result: dict[str, Any] = {
        "rotary_after_to_empty": _checks.mismatches(
            _checks.rotary_buffers(model), _checks.rotary_buffers(reference)
        ),
    }
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    batch = {k: v for k, v in _tiny.text_inputs().items() if k != "labels"}
    explain = ExplainWithBackend("eager")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model.eval(), backend=explain)(**batch).logits
        expected = reference(**batch).logits
    result["logits_equal"] = bool(torch.equal(got, expected))
    result["rotary_breaks"] = [
        reason.reason.splitlines()[0]
        for reason in explain.break_reasons
        if any("automodel_plugins/model/rotary.py" in frame.filename for frame in reason.user_stack)
    ]
    result["rotary_after_forward"] = _checks.mismatches(
        _checks.rotary_buffers(model), _checks.rotary_buffers(reference)
    )
    torch._dynamo.reset()
    return result


SCENARIOS = {"fsdp_rotary_compile": fsdp_rotary_compile}
