"""Expert LoRA factors split by expert under expert parallelism, for ``_worker.py``: the 4-expert Qwen3-VL-MoE of
:mod:`_expert_parallel` over 2 ranks (experts 0-1 and 2-3), LoRA r=4 on q/v and on both fused expert tensors.

Two flows: PEFT on the model built on meta, then ``parallelize_experts`` (the factors split there, then
initialized from the one-process values); and ``parallelize_experts``, load, then PEFT on the loaded model with a
different seed on each rank (the factors split as PEFT makes them: rank 0's initialization, broadcast). Measured
against one process (fp32) holding the whole model on both ranks' batches: each rank's factors are exactly its
experts' rows of PEFT's ``[r * E, in]`` / ``[out, r * E]`` factors (sliced here by PEFT's own reading of them,
``[E, r, in]`` and ``[out, r, E]``); the loss and every LoRA gradient; an AdamW step (its states held per rank for
its experts only) against the one-process step; PEFT's ``save_pretrained`` from every rank (the pytest process
compares the file with a one-process save) and ``PeftModel.from_pretrained`` of that file into a fresh split model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from distributed import _checks, _expert_parallel
from distributed._ep_lora import EXPERT_TARGETS, TARGETS, plan_facts
from distributed._expert_parallel import DTYPE, QWEN

R = 4
LR = 1e-2


def _lora(model: Any, seed: int) -> Any:
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=R, lora_alpha=8, target_modules=TARGETS, target_parameters=EXPERT_TARGETS, init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def expert_rows(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's experts' part of a whole expert factor, read as PEFT reads it (``get_delta_weight``): ``lora_A
    [r * E, in]`` as ``[E, r, in]``, ``lora_B [out, r * E]`` as ``[out, r, E]``; other tensors whole."""
    if ".experts" not in name:
        return full
    if ".lora_A." in name:
        experts = full.shape[0] // R
        mine = slice(rank * experts // world, (rank + 1) * experts // world)
        return full.reshape(experts, R, -1)[mine].reshape(-1, full.shape[1])
    experts = full.shape[1] // R
    mine = slice(rank * experts // world, (rank + 1) * experts // world)
    return full.reshape(full.shape[0], R, experts)[:, :, mine].reshape(full.shape[0], -1)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def ep_lora_shard(ctx: Any, order: str) -> dict[str, Any]:
    path = _expert_parallel.checkpoint(ctx, QWEN)
    single = _lora(automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE), seed=7)
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    model = automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE)
    if order == "peft_first":  # on meta: nothing initialized; the one-process values are copied in below
        model = _lora(model, seed=7)
        automodel_plugins.parallelize_experts(model, ctx.mesh)
        model.to_empty(device="cpu")
        automodel_plugins.load_weights(model, path)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    _checks.local_value(param).copy_(expert_rows(name, initial[name], ctx.rank, ctx.world))
    else:  # PEFT on the loaded split model, each rank its own seed: the experts' factors are rank 0's
        automodel_plugins.parallelize_experts(model, ctx.mesh)
        model.to_empty(device="cpu")
        automodel_plugins.load_weights(model, path)
        model = _lora(model, seed=7 if ctx.rank == 0 else 100 + ctx.rank)
        with torch.no_grad():  # the attention's adapters are replicated parameters: one process's values
            for name, param in model.named_parameters():
                if "lora_" in name and ".experts" not in name:
                    param.copy_(initial[name])
    experts = {n: p for n, p in model.named_parameters() if "lora_" in n and ".experts" in n}
    result: dict[str, Any] = {
        "placements": {
            n: [repr(p) for p in t.placements] for n, t in experts.items() if _checks.is_dtensor(t)
        },
        "global_shapes": {n: list(t.shape) for n, t in experts.items()},
        "local_shapes": {n: list(_checks.local_value(t).shape) for n, t in experts.items()},
        "single_shapes": {n: list(initial[n].shape) for n in experts},
        "init_mismatch": sorted(
            n
            for n, t in experts.items()
            if not torch.equal(_checks.local_value(t), expert_rows(n, initial[n], ctx.rank, ctx.world))
        ),
    }
    result.update(plan_facts(path, model, coordinate=(0, ctx.rank, 0), ep=ctx.world, dtype=DTYPE))
    runs = _expert_parallel.batches(single, QWEN, ctx.world)
    result.update(_expert_parallel._step(ctx, model, single, runs, sgd=False))
    # each rank's factor gradient is its experts' rows summed over both ranks' tokens: / world = one process's
    result["grad_rows_rel_diff"] = max(
        _rel(
            _checks.local_value(p.grad) / ctx.world,
            expert_rows(n, dict(single.named_parameters())[n].grad, ctx.rank, ctx.world),
        )
        for n, p in experts.items()
    )
    result.update(_adamw_step(ctx, model, single, runs))
    result.update(_save_and_reload(ctx, model, path, order, runs))
    return result


def _adamw_step(ctx: Any, model: Any, single: Any, runs: list) -> dict[str, Any]:
    """One AdamW step on both: the replicated adapters' gradients averaged over the ranks, the split ones divided
    by the ranks (they already hold every rank's tokens). Each rank's states for a split factor are its rows."""
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is None:
                continue
            if _checks.is_dtensor(param.grad):
                _checks.local_value(param.grad).div_(ctx.world)
            else:
                dist.all_reduce(param.grad)
                param.grad.div_(ctx.world)
    experts = {n: p for n, p in model.named_parameters() if "lora_" in n and ".experts" in n}
    before = {n: p.detach().clone() for n, p in single.named_parameters() if n in experts}
    # the same step on plain tensors: this rank's rows and their gradients alone
    local = {n: _checks.local_value(p).detach().clone().requires_grad_() for n, p in experts.items()}
    for name, tensor in local.items():
        tensor.grad = _checks.local_value(experts[name].grad).clone()
    torch.optim.AdamW(list(local.values()), lr=LR).step()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer.step()
    reference = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=LR)
    reference.step()
    single_params = dict(single.named_parameters())
    with torch.no_grad():
        after = _expert_parallel._mean(ctx, model(**runs[ctx.rank]).loss.item())
        single_after = (sum(single(**batch).loss for batch in runs) / len(runs)).item()
    return {
        "adam_states_split": sorted(
            n
            for n, p in experts.items()
            if all(
                _checks.is_dtensor(state := optimizer.state[p][key])
                and state.placements == p.placements
                and _checks.local_value(state).shape == _checks.local_value(p).shape
                and _checks.local_value(state).numel() * ctx.world == state.numel()
                for key in ("exp_avg", "exp_avg_sq")
            )
        ),
        "adam_local_max_diff": max(
            (_checks.local_value(p).detach() - local[n].detach()).abs().max().item()
            for n, p in experts.items()
        ),
        "adam_moved_from": max(  # the step moved the rows (by about lr): not a no-op
            (_checks.local_value(p).detach() - expert_rows(n, before[n], ctx.rank, ctx.world))
            .abs()
            .max()
            .item()
            for n, p in experts.items()
        ),
        # the one-process step, on the gradients equal above: AdamW's first step is lr * g / (|g| + eps), which
        # amplifies the gradients' rounding differences where |g| is tiny, so this is compared to lr
        "adam_vs_single_over_lr": max(
            (_checks.local_value(p).detach() - expert_rows(n, single_params[n], ctx.rank, ctx.world))
            .abs()
            .max()
            .item()
            for n, p in model.named_parameters()
            if "lora_" in n
        )
        / LR,
        "loss_after": after,
        "single_loss_after": single_after,
    }


def _save_and_reload(ctx: Any, model: Any, path: Any, order: str, runs: list) -> dict[str, Any]:
    """PEFT's ``save_pretrained`` from every rank (rank 0 writes; the gathered trained factors beside it for the
    pytest side), then ``PeftModel.from_pretrained`` of that file into a fresh split model on every rank."""
    import peft
    from safetensors.torch import save_file

    out = ctx.out / f"ep-lora-shard-{order}"
    trained = {n: _checks.full_value(p).detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in trained.items()}, out / "adapters.safetensors")
    model.save_pretrained(out / "adapter", is_main_process=ctx.rank == 0)
    dist.barrier()
    with torch.no_grad():
        loss = model(**runs[ctx.rank]).loss.item()

    base = automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE)
    automodel_plugins.parallelize_experts(base, ctx.mesh)
    base.to_empty(device="cpu")
    automodel_plugins.load_weights(base, path)
    torch.manual_seed(1000 + ctx.rank)  # whatever PEFT initializes first is overwritten by the file
    loaded = peft.PeftModel.from_pretrained(base, out / "adapter")
    factors = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    with torch.no_grad():
        loaded_loss = loaded(**runs[ctx.rank]).loss.item()
    return {
        "loaded_names": sorted(factors) == sorted(trained),
        "loaded_split": sorted(n for n, p in factors.items() if _checks.is_dtensor(p)),
        "loaded_mismatch": sorted(
            n
            for n, p in factors.items()
            if not torch.equal(_checks.local_value(p), expert_rows(n, trained[n], ctx.rank, ctx.world))
        ),
        "loss_trained": loss,
        "loss_loaded": loaded_loss,
    }


SCENARIOS = {
    "ep_lora_shard_peft_first": lambda ctx: ep_lora_shard(ctx, "peft_first"),
    "ep_lora_shard_peft_after_load": lambda ctx: ep_lora_shard(ctx, "peft_after_load"),
}
