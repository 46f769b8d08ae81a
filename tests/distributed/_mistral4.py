"""Mistral 4 (Mistral Small 4's HF form) scenarios for ``_worker.py``: FSDP2 loads of the fused experts with one
scale per expert (dequantized, and kept FP8 as ``Fp8Experts``) and of per-expert block-FP8 pieces, each against
the single-process load; a source-format save right after the sharded load. Rank 0 writes the tiny checkpoints
(``tests/mistral4_checkpoints.py``) on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mistral4_checkpoints import stored_tensors, tiny_model, write_checkpoint

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks

FORMS = {"mistral4_per_tensor": "per-tensor", "mistral4_per_expert": "block-per-expert"}


def checkpoint(ctx: Any, name: str) -> Path:
    """The tiny checkpoint ``name`` (written once, by rank 0)."""
    path = ctx.out / f"ckpt-{name}"
    if ctx.rank == 0 and not path.is_dir():
        write_checkpoint(tiny_model(), path, FORMS[name])
    dist.barrier()
    return path


def image_batch(config: Any) -> dict[str, torch.Tensor]:
    from automodel_plugins.testing.tiny_models import mistral3_image_batch

    return mistral3_image_batch(config, batch=2, seq=16, image_hw=(32, 32), labels=False)


def sharded(ctx: Any, path: Path, *, dequantize: bool) -> Any:
    """build on meta -> FSDP2 on every decoder layer and the root (experts ``Shard(0)``: 2 + 2) -> to_empty ->
    load_weights."""
    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(path, dequantize=dequantize)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    return model


def fsdp_load(ctx: Any, name: str, *, dequantize: bool = True) -> dict[str, Any]:
    """Gathered tensors, rotary buffers and logits with an image against one process's load; for a dequantized
    load, a source-format save right after, to be compared with the source bytes."""
    path = checkpoint(ctx, name)
    reference = automodel_plugins.from_pretrained(path, dequantize=dequantize).eval()
    model = sharded(ctx, path, dequantize=dequantize)
    tensors = model_tensors(model)
    gathered = {n: _checks.full_value(t) for n, t in tensors.items()}
    result: dict[str, Any] = {
        "full_mismatches": _checks.mismatches(gathered, model_tensors(reference)),
        "plain_tensors": sorted(n for n, t in tensors.items() if not _checks.is_dtensor(t)),
        "resident_experts": sum(isinstance(m, Fp8Experts) for m in model.modules()),
        "rotary_mismatches": _checks.mismatches(
            _checks.rotary_buffers(model), _checks.rotary_buffers(reference)
        ),
    }
    experts = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    result["expert_region"] = _checks.chunk_bounds(tensors[experts])
    result["expert_dtype"] = str(tensors[experts].dtype)
    model.eval()
    batch = image_batch(reference.config)
    with torch.no_grad():
        result["logits_equal"] = bool(torch.equal(model(**batch).logits, reference(**batch).logits))
    model.reshard()
    out = ctx.out / f"{name}-{'bf16' if dequantize else 'fp8'}-save"
    automodel_plugins.save_pretrained(model, out)
    dist.barrier()
    if ctx.rank == 0:
        saved, source = stored_tensors(out), stored_tensors(path)
        result["save_keys_equal"] = sorted(saved) == sorted(source)
        result["save_different"] = sorted(
            key
            for key, value in source.items()
            if key not in saved
            or not torch.equal(saved[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
        )
    return result


def expert_split(ctx: Any, name: str, expert_dim: int) -> dict[str, Any]:
    """Expert parameters ``distribute_tensor``-ed ``Shard(expert_dim)`` (0: expert parallelism, experts 0-1 and
    2-3; 1: rows of every expert, inside the one whole-matrix block of a ``[E, 1, 1]`` scale), everything else
    replicated: this rank's values and the gathered ones against one process's load, and what it read."""
    from torch import nn
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from automodel_plugins.checkpoint import Checkpoint

    path = checkpoint(ctx, name)
    reference = automodel_plugins.from_pretrained(path).eval()
    model = automodel_plugins.build_model(path)
    for param_name, param in list(model.named_parameters()):
        expert = param_name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        module_name, _, leaf = param_name.rpartition(".")
        value = distribute_tensor(param.detach(), ctx.mesh, [Shard(expert_dim) if expert else Replicate()])
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(
            value, requires_grad=param.requires_grad
        )
    model.to_empty(device="cpu")
    with _checks.record_reads() as reads:
        automodel_plugins.load_weights(model, path)
    expert_reads = [(key, bounds) for key, bounds in reads if ".experts." in key and "scale" not in key]
    with Checkpoint.open(path) as opened:
        expert_bytes = sum(
            opened.info(key).nbytes for key in opened if ".experts." in key and "scale" not in key
        )
        expert_bytes_read = sum(_checks._read_bytes(opened, key, bounds) for key, bounds in expert_reads)
    gathered = {n: _checks.full_value(t) for n, t in model_tensors(model).items()}
    return {
        "local_mismatches": _checks.local_mismatches(model, reference.state_dict()),
        "full_mismatches": _checks.mismatches(gathered, model_tensors(reference)),
        "expert_reads": _checks.sorted_reads(expert_reads),
        "expert_bytes": expert_bytes,
        "expert_bytes_read": expert_bytes_read,
    }


SCENARIOS = {
    "mistral4_fsdp_per_tensor": lambda ctx: fsdp_load(ctx, "mistral4_per_tensor"),
    "mistral4_fsdp_per_expert": lambda ctx: fsdp_load(ctx, "mistral4_per_expert"),
    "mistral4_fsdp_resident": lambda ctx: fsdp_load(ctx, "mistral4_per_tensor", dequantize=False),
    "mistral4_expert_parallel": lambda ctx: expert_split(ctx, "mistral4_per_tensor", 0),
    "mistral4_expert_rows": lambda ctx: expert_split(ctx, "mistral4_per_tensor", 1),
    "mistral4_expert_parallel_pieces": lambda ctx: expert_split(ctx, "mistral4_per_expert", 0),
}
