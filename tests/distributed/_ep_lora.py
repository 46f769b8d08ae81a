"""LoRA on FP8-resident experts (PEFT ``target_parameters`` on ``Fp8Experts``) under expert parallelism, for
``_worker.py``: the 4-expert Qwen3-VL-MoE checkpoint of :mod:`_expert_parallel` split by expert over 2 ranks
(experts 0-1 and 2-3), LoRA on q/v and on both fused expert tensors, in both orders a user writes (PEFT on the
model built on meta, then ``parallelize_experts``; or ``parallelize_experts`` first, then PEFT). Each rank runs its
own batch; against one process holding the whole model on both batches (fp32): the LoRA gradients (averaged over
the ranks, as data parallelism averages them; the experts' factors, split by expert, each rank its experts' rows), the losses before and after an SGD step, the codes unchanged; then
``merge_lora`` on every rank (each re-quantizes its own moved experts) and a source-format save from every rank,
which the pytest process compares with a one-process merge and save of the same adapters (rank 0 writes them and
PEFT's adapter save)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from automodel_plugins.errors import ExpertParallelError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks, _expert_parallel
from distributed._expert_parallel import DTYPE, QWEN

TARGETS = ["q_proj", "v_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def with_experts_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(7)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, target_parameters=EXPERT_TARGETS, init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def ep_experts_lora(ctx: Any, order: str) -> dict[str, Any]:
    path = _expert_parallel.checkpoint(ctx, QWEN)
    plain = automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE)
    codes_before = {n: t.clone() for n, t in model_tensors(plain).items() if ".experts." in n}
    single = with_experts_lora(plain)
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}

    model = automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE)
    if order == "peft_first":
        model = with_experts_lora(model)
        applied = automodel_plugins.parallelize_experts(model, ctx.mesh)
    else:
        applied = automodel_plugins.parallelize_experts(model, ctx.mesh)
        model = with_experts_lora(model)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():  # the experts' factors are split by expert (DTensors): each rank its experts' rows
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    result: dict[str, Any] = {"applied": applied}
    result.update(plan_facts(path, model, coordinate=(0, ctx.rank, 0), ep=ctx.world, dtype=DTYPE))
    result["lora_shapes"] = {
        n: list(p.shape) for n, p in model.named_parameters() if "lora_" in n and ".experts" in n
    }
    result["single_lora_shapes"] = {
        n: list(p.shape) for n, p in single.named_parameters() if "lora_" in n and ".experts" in n
    }
    runs = _expert_parallel.batches(single, QWEN, ctx.world)
    result.update(_expert_parallel._step(ctx, model, single, runs, sgd=True))
    result["expert_lora_grads"] = sum(
        ".experts" in n and p.grad is not None for n, p in model.named_parameters() if "lora_" in n
    )
    held = {
        _plain_name(n): t for n, t in model_tensors(model).items() if ".experts." in n and "lora_" not in n
    }
    result["codes_changed"] = sorted(
        n
        for n, t in held.items()
        if not torch.equal(_checks.local_value(t), _checks.local_part(t, codes_before[n]))
    )
    trained = {n: _checks.full_value(p).detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    out = ctx.out / f"ep-lora-{order}"
    if ctx.rank == 0:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in trained.items()}, out / "adapters.safetensors")
    # PEFT's own adapter save under expert parallelism: every rank (it gathers the split factors), rank 0 writes
    model.save_pretrained(out / "adapter", is_main_process=ctx.rank == 0)
    dist.barrier()

    merged = automodel_plugins.merge_lora(model)  # every rank: its own experts (and the replicated q/v)
    result["resident_experts"] = sum(isinstance(m, Fp8Experts) for m in merged.modules())
    result["lora_left"] = sum("lora_" in n for n, _ in merged.named_parameters())
    after = {
        _plain_name(n): t
        for n, t in model_tensors(merged).items()
        if _plain_name(n) in codes_before and "scale" not in n
    }
    result["moved_here"] = {
        n: [
            _checks.chunk_bounds(t)[0][0] + i
            for i, (a, b) in enumerate(
                zip(_checks.local_value(t), _checks.local_part(t, codes_before[n]), strict=True)
            )
            if not torch.equal(a, b)
        ]
        for n, t in after.items()
    }
    result["expert_regions"] = {n: _checks.chunk_bounds(t) for n, t in after.items()}
    report = automodel_plugins.save_pretrained(merged, out / "merged")
    result["bytes_written_by_rank"] = report.bytes_written_by_rank
    dist.barrier()
    return result


def lora_bytes(model: Any) -> int:
    """Bytes of this rank's local shards of every LoRA parameter."""
    return sum(
        _checks.local_value(p).numel() * _checks.local_value(p).element_size()
        for n, p in model.named_parameters()
        if "lora_" in n
    )


def plan_facts(path: Any, model: Any, *, coordinate: tuple[int, int, int], **degrees: Any) -> dict[str, Any]:
    """``plan_memory`` with LoRA r=4 on q/v and on both fused expert tensors, the planned rank at ``coordinate``:
    its LoRA parameter bytes (and without ``target_parameters``) against this rank's measured LoRA bytes."""
    from automodel_plugins.pipeline.load.memory_plan import plan_memory

    def planned(target_parameters: list[str]) -> dict[str, int]:
        plan = plan_memory(
            path,
            dequantize=False,
            lora_r=4,
            lora_targets=TARGETS,
            lora_target_parameters=target_parameters,
            **degrees,
        )
        (mine,) = [rank for rank in plan.ranks if rank.coordinate == coordinate]
        return dict(mine.lora)

    return {
        "measured_lora": lora_bytes(model),
        "planned_lora": planned(EXPERT_TARGETS),
        "planned_attention_lora": planned([]),
    }


def fsdp_experts_lora_plan(ctx: Any) -> dict[str, Any]:
    """FSDP2 over 2 ranks (:func:`_experts_lora.sharded_model`: 5 experts, LoRA on q/v and both fused tensors):
    the plan's LoRA bytes for this rank against what it holds."""
    from distributed import _experts_lora, _tiny

    path = ctx.checkpoint(_tiny.MOE_ALIGNED)
    model = _experts_lora.sharded_model(ctx, path)
    return plan_facts(path, model, coordinate=(ctx.rank, 0, 0), fsdp=ctx.world)


def ep_fsdp_experts_lora(ctx: Any) -> dict[str, Any]:
    """4 ranks, mesh (ep=2, dp=2): PEFT on meta -> ``parallelize_experts`` over ep (the experts' factors split by
    expert) -> ``fully_shard_experts`` over dp (the experts and their factors) -> every decoder layer and the root
    HSDP over the mesh (the other adapters sharded over dp, replicated over ep) -> load; the plan's LoRA bytes. FSDP2's averaged adapter gradients, gathered, against one process on the mean of the 4 ranks'
    losses; then ``merge_lora`` and a save from every rank (the pytest side compares the files)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, ctx.world // 2), mesh_dim_names=("ep", "dp"))
    path = _expert_parallel.checkpoint(ctx, QWEN)
    plain = automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE)
    codes_before = {n: t.clone() for n, t in model_tensors(plain).items() if ".experts." in n}
    single = with_experts_lora(plain)
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    model = with_experts_lora(automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE))
    applied = automodel_plugins.parallelize_experts(model, mesh["ep"])
    automodel_plugins.fully_shard_experts(model, mesh["dp"])
    for layer in model.get_base_model().model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    ep_index, dp_index = mesh.get_coordinate()
    facts = plan_facts(path, model, coordinate=(dp_index, ep_index, 0), fsdp=2, ep=2, dtype=DTYPE)
    runs = _expert_parallel.batches(single, QWEN, ctx.world)
    model.train(), single.train()
    loss = model(**runs[ctx.rank]).loss
    loss.backward()
    single_loss = sum(single(**batch).loss for batch in runs) / len(runs)
    single_loss.backward()
    single_params = dict(single.named_parameters())
    diffs = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            want = single_params[name].grad
            diffs[name] = (_checks.full_value(param.grad) - want).abs().max().item() / max(
                want.abs().max().item(), 1e-12
            )
    result: dict[str, Any] = {
        "applied": applied,
        "grad_names": sorted(diffs),
        "single_grad_names": sorted(n for n, p in single_params.items() if p.grad is not None),
        "max_grad_rel_diff": max(diffs.values()),
        "worst_grad": max(diffs, key=diffs.get),
        "loss": _expert_parallel._mean(ctx, loss.item()),
        "single_loss": single_loss.item(),
        **facts,
    }
    held = {
        _plain_name(n): t for n, t in model_tensors(model).items() if ".experts." in n and "lora_" not in n
    }
    result["codes_changed"] = sorted(
        n for n, t in held.items() if not torch.equal(_checks.full_value(t), codes_before[n])
    )
    with torch.no_grad():  # an SGD step, then merge the trained adapters (pytest merges them one-process)
        for param in model.parameters():
            if param.grad is not None:
                _checks.local_value(param).sub_(0.5 * _checks.local_value(param.grad))
    trained = {n: _checks.full_value(p).detach() for n, p in model.named_parameters() if "lora_" in n}
    out = ctx.out / "ep-lora-fsdp"
    if ctx.rank == 0:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in trained.items()}, out / "adapters.safetensors")
    dist.barrier()
    merged = automodel_plugins.merge_lora(model)
    result["lora_left"] = sum("lora_" in n for n, _ in merged.named_parameters())
    automodel_plugins.save_pretrained(merged, out / "merged")
    dist.barrier()
    return result


def ep_experts_lora_refusals(ctx: Any) -> dict[str, Any]:
    """Dequantized (stock) experts with LoRA on them: PEFT first is refused by ``parallelize_experts``, by name;
    PEFT after fails in stock PEFT's first forward (its parametrization adds plain factors to the fused DTensor),
    recorded as what stock does."""
    path = _expert_parallel.checkpoint(ctx, QWEN)
    out: dict[str, Any] = {}
    model = with_experts_lora(automodel_plugins.build_model(path, dequantize=True, dtype=DTYPE))
    out["peft_first"] = _error(lambda: automodel_plugins.parallelize_experts(model, ctx.mesh))
    model = automodel_plugins.build_model(path, dequantize=True, dtype=DTYPE)
    automodel_plugins.parallelize_experts(model, ctx.mesh)
    model = with_experts_lora(model)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    batch = _expert_parallel.batches(model.get_base_model(), QWEN, ctx.world)[ctx.rank]
    out["peft_after"] = _error(lambda: model(**batch))
    return out


def _error(call: Any) -> str | None:
    try:
        call()
    except (ExpertParallelError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _plain_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


SCENARIOS = {
    "ep_experts_lora_peft_first": lambda ctx: ep_experts_lora(ctx, "peft_first"),
    "ep_experts_lora_peft_after": lambda ctx: ep_experts_lora(ctx, "peft_after"),
    "ep_experts_lora_refusals": ep_experts_lora_refusals,
    "fsdp_experts_lora_plan": fsdp_experts_lora_plan,
    "ep_fsdp_experts_lora": ep_fsdp_experts_lora,  # 4 ranks: test_ep_lora_fsdp.py
}
