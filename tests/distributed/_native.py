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


SCENARIOS: dict[str, Any] = {"fsdp_native_resident": fsdp_native_resident}


# --- Mistral Large 3's form, tiny: compressed-tensors FP8_BLOCK, per-expert pieces ----------------------------


def large3_like(ctx: Any) -> Any:
    """The tiny Large-3-form checkpoint (written once, by rank 0)."""
    import torch.distributed as dist
    from mistral_native_checkpoints import tiny_mla_model, write_large3_like

    path = ctx.out / "ckpt-native-large3-like"
    if ctx.rank == 0 and not path.is_dir():
        write_large3_like(tiny_mla_model(hidden_size=72, moe_intermediate_size=32), path, "weight_scale")
    dist.barrier()
    return path


def large3_fsdp(ctx: Any, *, dequantize: bool) -> dict[str, Any]:
    """FSDP2 on every decoder layer and the root (experts ``Shard(0)``): gathered tensors and logits with an
    image equal the single-process load's (dequantized, or FP8-resident: ``Fp8Experts`` codes sharded)."""
    from distributed import _mistral4

    path = large3_like(ctx)
    reference = automodel_plugins.from_pretrained(path, dequantize=dequantize).eval()
    model = _mistral4.sharded(ctx, path, dequantize=dequantize)
    tensors = model_tensors(model)
    gathered = {name: _checks.full_value(t) for name, t in tensors.items()}
    experts = tensors["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    result: dict[str, Any] = {
        "full_mismatches": _checks.mismatches(gathered, model_tensors(reference)),
        "expert_region": _checks.chunk_bounds(experts),
        "expert_dtype": str(experts.dtype),
    }
    model.eval()
    batch = _mistral4.image_batch(reference.config)
    with torch.no_grad():
        result["logits_equal"] = bool(torch.equal(model(**batch).logits, reference(**batch).logits))
    return result


def large3_expert_parallel(ctx: Any) -> dict[str, Any]:
    """The expert tensors ``Shard(0)`` (each rank 2 of the 4 experts), everything else replicated: this rank reads
    only its experts' ``experts.E.w1/w2/w3`` pieces, every expert byte once between the ranks."""
    from torch import nn
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from automodel_plugins.checkpoint import Checkpoint

    path = large3_like(ctx)
    reference = automodel_plugins.from_pretrained(path).eval()
    model = automodel_plugins.build_model(path)
    for name, param in list(model.named_parameters()):
        expert = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        module, _, leaf = name.rpartition(".")
        value = distribute_tensor(param.detach(), ctx.mesh, [Shard(0) if expert else Replicate()])
        model.get_submodule(module)._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)
    model.to_empty(device="cpu")
    with _checks.record_reads() as reads:
        automodel_plugins.load_weights(model, path)
    pieces = sorted({key for key, _ in reads if ".experts." in key and "scale" not in key})
    with Checkpoint.open(path) as opened:
        expert_keys = [key for key in opened if ".experts." in key and "scale" not in key]
    gathered = {name: _checks.full_value(t) for name, t in model_tensors(model).items()}
    return {
        "full_mismatches": _checks.mismatches(gathered, model_tensors(reference)),
        "experts_read": sorted({int(key.split(".")[3]) for key in pieces}),
        "pieces_read": len(pieces),
        "pieces_total": len(expert_keys),
    }


SCENARIOS.update(
    {
        "native_large3_fsdp": lambda ctx: large3_fsdp(ctx, dequantize=True),
        "native_large3_fsdp_resident": lambda ctx: large3_fsdp(ctx, dequantize=False),
        "native_large3_expert_parallel": large3_expert_parallel,
    }
)
