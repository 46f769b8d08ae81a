"""Mistral-native saves from every rank of an FSDP2 run (2 CPU ranks, gloo), for ``_worker.py``: native in,
native out, each rank writing the regions it holds.

Two checkpoints, written by rank 0 on first use: ``native_cut_heads``, the tiny Ministral 3 VLM (odd hidden
size 67) with 3 attention heads and 1 KV head of 16 rows, so that FSDP2's 24 + 24 rows of q and 8 + 8 rows of k
cut a head (their rows are in Mistral's rotary order, permuted within each head: gathered and written by rank
0), while the vision tower's 2 heads split on a head boundary (each rank writes its own heads); and
``native_mla``, the tiny Mistral 4 VLM (MLA, per-expert pieces with one scale each) in native per-tensor FP8
(``tests/mistral_native_checkpoints.py``). Each is saved right after the load (to be the
source's bytes) and after a weight was grown past its scale and another shrunk inside it (to be what one
process writes for the gathered weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks, _tiny

MOVED = {  # checkpoint -> (weight grown 3x past its scale, weight halved inside it)
    "native_cut_heads": (
        "model.language_model.layers.1.mlp.up_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ),
    "native_mla": (
        "model.language_model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.language_model.layers.1.mlp.experts.down_proj",
    ),
}


def write_cut_heads(path: Path) -> None:
    from mistral_native_checkpoints import write_fp8_native, write_native
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.tiny_models import tiny_mistral3_config

    torch.manual_seed(0)
    config = tiny_mistral3_config(
        **_tiny.TEXT,
        num_attention_heads=3,
        num_key_value_heads=1,
        vision={**_tiny.VISION, "hidden_act": "silu"},
    )
    model = Mistral3ForConditionalGeneration(config)
    _tiny._perturb_norms(model)
    write_fp8_native(write_native(path.with_name(path.name + "-bf16"), model), model, path)


def write_mla(path: Path) -> None:
    from mistral_native_checkpoints import mla_model, write_mla_fp8_native

    write_mla_fp8_native(mla_model(), path)


WRITERS = {"native_cut_heads": write_cut_heads, "native_mla": write_mla}


def checkpoint(ctx: Any, name: str) -> Path:
    path = ctx.out / f"ckpt-{name}"
    if ctx.rank == 0 and not path.is_dir():
        WRITERS[name](path)
    dist.barrier()
    return path


def _report(report: Any) -> dict[str, Any]:
    return {
        "bytes_written_by_rank": report.bytes_written_by_rank,
        "quantized": report.quantized,
        "scales_kept": report.scales_kept,
        "scales_fresh": report.scales_fresh,
        "files": report.files,
    }


def fsdp_native_save(ctx: Any, name: str) -> dict[str, Any]:
    """build on meta -> FSDP2 on every decoder layer and the root -> to_empty -> load_weights -> save (every
    rank), then grow / shrink the two ``MOVED`` weights and save again; the gathered trained weights for the
    single-process comparison (rank 0 writes them)."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    path = checkpoint(ctx, name)
    out = ctx.out / f"{name}-fsdp-save"
    model = automodel_plugins.build_model(path)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    tensors = model_tensors(model)
    result: dict[str, Any] = {
        "plain_tensors": sorted(n for n, t in tensors.items() if not _checks.is_dtensor(t)),
        "regions": {
            n: _checks.chunk_bounds(t)
            for n, t in tensors.items()
            if n.endswith(("q_proj.weight", "k_proj.weight"))
        },
    }
    result["untouched"] = _report(automodel_plugins.save_pretrained(model, out / "untouched"))
    grown, shrunk = MOVED[name]
    with torch.no_grad():
        model.get_parameter(grown).mul_(3.0)
        model.get_parameter(shrunk).mul_(0.5)
    result["trained"] = _report(automodel_plugins.save_pretrained(model, out / "trained"))
    state = {n: _checks.full_value(t).detach().contiguous() for n, t in model.state_dict().items()}
    if ctx.rank == 0:
        save_file(state, out / "trained-weights.safetensors")
    dist.barrier()
    return result


SCENARIOS = {
    "native_fsdp_save_cut_heads": lambda ctx: fsdp_native_save(ctx, "native_cut_heads"),
    "native_fsdp_save_mla": lambda ctx: fsdp_native_save(ctx, "native_mla"),
}
