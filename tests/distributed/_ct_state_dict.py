"""FP8-resident compressed-tensors models on 2 CPU ranks (FSDP2 on every decoder layer and the root, the
``build_model`` -> ``fully_shard`` -> ``to_empty`` -> ``load_weights`` flow), for ``_worker.py``: their state dict
in compressed-tensors' names through ``torch.distributed.checkpoint`` (``get_model_state_dict`` -> ``dcp.save`` ->
``dcp.load`` into a second sharded model whose codes and scales were all changed -> ``set_model_state_dict``),
then gathered and compared on each rank with the source's tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from automodel_plugins.model.fp8_linear import fp8_linear_modules

FORMS = ("tensor-static", "block-partial-edges")  # keys of test_compressed_tensors_stock_save.FORMS


def checkpoint(ctx: Any, form: str) -> Path:
    from test_compressed_tensors_state_dict import write_compressed_tensors

    path = ctx.out / f"ckpt-ct-{form}" / "ct"
    if ctx.rank == 0 and not path.is_dir():
        write_compressed_tensors(path, form)
    dist.barrier()
    return path


def _sharded(ctx: Any, path: Path) -> Any:
    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(path, dequantize=False, dtype=torch.float32)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    return model


def ct_dcp_round_trip(ctx: Any, form: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from mistral3_checkpoints import checkpoint_tensors, legacy_name
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    path = checkpoint(ctx, form)
    state = get_model_state_dict(_sharded(ctx, path))
    keys = sorted(state)
    where = ctx.out / f"ct-dcp-{form}"
    dcp.save(state, checkpoint_id=where)
    model = _sharded(ctx, path)
    with torch.no_grad():
        for layer in fp8_linear_modules(model).values():
            layer.weight_scale_inv.mul_(3)
            layer.weight.to_local().zero_()
            if layer.activation_scale is not None:
                layer.activation_scale.mul_(5)
    again = get_model_state_dict(model)
    dcp.load(again, checkpoint_id=where)
    set_model_state_dict(model, again)
    full = {}
    for (
        key,
        value,
    ) in model.state_dict().items():  # gathered; FP8 codes as the uint8 parameter (gloo has no float8)
        if value.dtype == torch.float8_e4m3fn:
            value = model.get_parameter(key).full_tensor().view(torch.float8_e4m3fn)
        full[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    runtime = {legacy_name(name): name for name in full}
    mismatches, checked = [], 0
    for key, value in checkpoint_tensors(path).items():
        if value.dtype == torch.float8_e4m3fn:
            got = full[runtime[key]]
            same = got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.view(torch.uint8))
        elif key.endswith(("weight_scale", "input_scale")):
            got = full[runtime[key]]
            same = tuple(got.shape) == tuple(value.shape) and torch.equal(got, value.float())
        else:
            continue
        checked += 1
        if not same:
            mismatches.append(key)
    return {
        "keys": keys,
        "sharded_codes": sum(1 for k, v in state.items() if k.endswith(".weight") and hasattr(v, "to_local")),
        "checked": checked,
        "mismatches": mismatches,
    }


SCENARIOS = {
    f"ct_dcp_{form.replace('-', '_')}": (lambda f: lambda ctx: ct_dcp_round_trip(ctx, f))(form)
    for form in FORMS
}
