"""Mistral-native scenarios for ``_worker.py``: an FP8-resident (``dequantize=False``) FSDP2 load of a native
checkpoint whose q/k rows are stored in Mistral's rotary order. Each rank reads its q/k pieces' rows whole (a
head's rows are spread over them), permutes the codes into transformers' order and keeps its shard of them;
gathered, the codes and scales equal the single-process FP8-resident load's, and so do the logits."""

from __future__ import annotations

from typing import Any

import torch

import automodel_plugins
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks, _tiny

Q_KEY = "layers.0.attention.wq.weight"


def fsdp_native_resident(ctx: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    path = ctx.checkpoint(_tiny.NATIVE)
    reference = automodel_plugins.from_pretrained(path, dequantize=False)
    model = automodel_plugins.build_model(path, dequantize=False)
    layers = model.model.language_model.layers
    # q's codes alone as an FSDP2 unit (uint8: a BF16 mixed-precision policy leaves them alone), so that each
    # rank holds a row shard of a rotary-order weight
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False)
    fully_shard(layers[0].self_attn.q_proj, mesh=ctx.mesh, mp_policy=policy)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    with _checks.record_reads() as reads:
        automodel_plugins.load_weights(model, path)
    q_proj = layers[0].self_attn.q_proj
    result: dict[str, Any] = {
        "q_resident": isinstance(q_proj, Fp8Linear),
        "q_rows": [int(_checks.local_value(q_proj.weight).shape[0]), int(q_proj.weight.shape[0])],
        "q_bounds": [bounds for key, bounds in reads if key == Q_KEY],
    }
    gathered = {name: _checks.full_value(t) for name, t in model_tensors(model).items()}
    result["full_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    model.eval()
    batch = _tiny.inputs()
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        want = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
    result["logits_equal"] = bool(torch.equal(got, want))
    return result


SCENARIOS = {"fsdp_native_resident": fsdp_native_resident}
