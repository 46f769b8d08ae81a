"""LoRA on the FP8-resident experts themselves (PEFT ``target_parameters`` on ``Fp8Experts``) under FSDP2, for
``_worker.py``: the tiny aligned Qwen3-VL-MoE (5 experts: ``Shard(0)`` puts experts 0-2 on rank 0, 3-4 on rank
1), LoRA on q/v and on both fused expert tensors. A step on 2 ranks (each its own sequence) against one process on
the mean of both sequences' losses; then ``merge_lora`` on every rank (each re-quantizes its own experts; the fresh
scale cells are summed over the ranks) and ``save_pretrained`` from every rank, against a one-process merge and
save of the same trained adapters (rank 0 writes them to ``adapters.safetensors``; the pytest process, outside
the process group, merges and saves them the one-process way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks, _tiny

TARGETS = ["q_proj", "v_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def with_experts_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(5)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, target_parameters=EXPERT_TARGETS, init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def sharded_model(ctx: Any, path: Path) -> Any:
    """build on meta (experts ``Fp8Experts``) -> LoRA -> FSDP2 on every decoder layer and the root -> to_empty
    -> load_weights."""
    from torch.distributed.fsdp import fully_shard

    model = with_experts_lora(automodel_plugins.build_model(path, dequantize=False))
    for layer in model.get_base_model().model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    return model


def mean_step(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[dict, dict, list[float]]:
    """One SGD step on the mean of ``batches``' losses: full gradients, full parameters after, losses before and
    after (the mean FSDP2's averaged gradients give when every rank's batch has as many labels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss = sum(model(**batch).loss for batch in batches) / len(batches)
    loss.backward()
    grads = {n: _checks.full_value(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    after = {n: _checks.full_value(p).detach() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_after = sum(model(**batch).loss for batch in batches) / len(batches)
    return grads, after, [loss.item(), loss_after.item()]


def moe_fsdp_experts_lora(ctx: Any) -> dict[str, Any]:
    path = ctx.checkpoint(_tiny.MOE_ALIGNED)
    out = ctx.out / "experts-lora"
    batches = [_tiny.moe_inputs(aligned=True, batch=1, seed=1 + rank) for rank in range(ctx.world)]
    plain = automodel_plugins.from_pretrained(path, dequantize=False)
    codes_before = {n: t.clone() for n, t in model_tensors(plain).items() if ".experts." in n}
    single = with_experts_lora(plain).train()
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    single_grads, _, single_losses = mean_step(single, batches)

    model = sharded_model(ctx, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    model.train()
    grads, trained, losses = mean_step(model, [batches[ctx.rank]])
    mean_losses = []
    for loss in losses:
        value = torch.tensor(loss)
        dist.all_reduce(value)
        mean_losses.append(value.item() / ctx.world)
    experts_left = {
        plain_name(n): _checks.full_value(t)
        for n, t in model_tensors(model).items()
        if ".experts." in n and "lora_" not in n
    }
    result: dict[str, Any] = {
        "losses": mean_losses,
        "single_losses": single_losses,
        "grad_names": sorted(grads),
        "single_grad_names": sorted(single_grads),
        "grad_diffs": {n: (grads[n] - single_grads[n]).abs().max().item() for n in single_grads},
        "largest_grad": max(g.abs().max().item() for g in single_grads.values()),
        "codes_placements": {
            plain_name(n): _checks.chunk_bounds(t)
            for n, t in model_tensors(model).items()
            if n.endswith(".gate_up_proj") and ".experts." in n
        },
        "codes_changed": _checks.mismatches(experts_left, codes_before),
    }

    merged = automodel_plugins.merge_lora(model)  # every rank: each merges the experts (and rows) it holds
    result["resident_experts"] = sum(isinstance(m, Fp8Experts) for m in merged.modules())
    result["lora_left"] = sum("lora_" in n for n, _ in merged.named_parameters())
    result["experts_sharded"] = [
        _checks.is_dtensor(m.gate_up_proj) for m in merged.modules() if isinstance(m, Fp8Experts)
    ]
    report = automodel_plugins.save_pretrained(merged, out / "sharded")
    result["bytes_written_by_rank"] = report.bytes_written_by_rank

    reference = with_experts_lora(automodel_plugins.from_pretrained(path, dequantize=False))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(trained[name])
    reference = automodel_plugins.merge_lora(reference)
    gathered = {n: _checks.full_value(t) for n, t in model_tensors(merged).items()}
    result["merge_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    result["moved_experts"] = {
        n: int((t.view(torch.uint8) != codes_before[n].view(torch.uint8)).flatten(1).any(1).sum())
        for n, t in model_tensors(reference).items()
        if n in codes_before and not n.endswith("_scale_inv")
    }
    if ctx.rank == 0:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in trained.items()}, out / "adapters.safetensors")
    dist.barrier()
    return result


def plain_name(name: str) -> str:
    """A tensor's name in the model without PEFT's wrappers."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


SCENARIOS = {"moe_fsdp_experts_lora": moe_fsdp_experts_lora}
