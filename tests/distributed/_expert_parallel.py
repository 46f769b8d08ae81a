"""Expert parallelism (``automodel_plugins.parallelize_experts``) scenarios for ``_worker.py``: the experts of a
MoE split by expert over the ranks (``Shard(0)``: experts 0-1 and 2-3 of 4), FP8-resident (``Fp8Experts``) and
dequantized, on a Qwen3-VL-MoE checkpoint (the FP8 releases' per-expert block pieces), Mistral 4 in its HF forms
(fused experts with one scale per expert; per-expert block pieces) and a Mistral-native MoE checkpoint
(``params.json`` + ``consolidated.safetensors``, ``layers.N.experts.E.w1/w2/w3``). Each rank runs its own batch
(tokens go to the experts' ranks by all-to-all); everything is compared with one process holding the whole model
on both batches, in fp32. ``ep_fsdp_*`` run on 4 ranks: a ``(dp=2, ep=2)`` mesh, the experts split by expert over
``ep`` and FSDP2-sharded over ``dp``, the rest HSDP over the mesh. Rank 0 writes the checkpoints on first use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import automodel_plugins
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import ExpertParallelError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks

EXPERTS = 4
DTYPE = torch.float32
QWEN = "ep_qwen3_vl_moe"
MISTRAL4_FUSED, MISTRAL4_PIECES, NATIVE = "ep_mistral4_fused", "ep_mistral4_pieces", "ep_mistral_native_moe"
_EXPERT_KEY = re.compile(r"experts\.(\d+)\.")


# --- checkpoints -------------------------------------------------------------------------------------------


def _write_qwen(path: Path) -> None:
    from transformers import Qwen3VLMoeForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
    from distributed import _tiny

    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(_qwen_config())
    with torch.no_grad():  # routers that spread the tokens over every expert
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    write_fp8_checkpoint(
        model,
        path,
        block_size=_tiny.BLOCK,
        activation_scale_name=None,
        modules_to_not_convert=_tiny.MOE_NOT_CONVERTED,
        shards=2,
        experts="per-expert",
        quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"},
    )


def _qwen_config() -> Any:
    from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

    sizes = {"hidden_size": 48, "moe_intermediate_size": 32, "vocab_size": 251, "num_experts": EXPERTS}
    return tiny_qwen3_vl_moe_config(**sizes)


def _write_mistral4(path: Path, form: str, **kwargs: Any) -> None:
    """Mistral 4's HF forms; per-expert pieces in 8x8 blocks, which the expert width 24 (gate | up) respects."""
    from mistral4_checkpoints import tiny_model, write_checkpoint

    write_checkpoint(tiny_model(), path, form, **kwargs)


def _write_native(path: Path) -> None:
    from mistral_native_moe import write_mla_moe_native

    write_mla_moe_native(path)


WRITERS = {
    QWEN: _write_qwen,
    MISTRAL4_FUSED: lambda path: _write_mistral4(path, "per-tensor"),
    MISTRAL4_PIECES: lambda path: _write_mistral4(path, "block-per-expert", block=(8, 8)),
    NATIVE: _write_native,
}


def checkpoint(ctx: Any, name: str) -> Path:
    """The tiny checkpoint ``name`` (written once, by rank 0)."""
    path = ctx.out / f"ckpt-{name}"
    if ctx.rank == 0 and not path.is_dir():
        WRITERS[name](path)
    dist.barrier()
    return path


def batches(model: Any, name: str, count: int) -> list[dict[str, torch.Tensor]]:
    """One batch per rank (different tokens: the all-to-all's split sizes differ by rank), labels included."""
    from automodel_plugins.testing.tiny_models import mistral3_image_batch, qwen3_vl_image_batch

    config = model.config
    if name == QWEN:
        return [qwen3_vl_image_batch(config, seed=1 + r, batch=2) for r in range(count)]
    return [
        mistral3_image_batch(config, batch=2, seq=16, image_hw=(32, 32), seed=1 + r, dtype=DTYPE)
        for r in range(count)
    ]


# --- the flow ----------------------------------------------------------------------------------------------


def ep_model(path: Path, ep_mesh: Any, *, dequantize: bool, fsdp: Any = None) -> tuple[Any, dict[str, str]]:
    """build on meta -> ``parallelize_experts`` -> (``fsdp``: an (ep, dp) mesh: the experts FSDP2 over dp, every
    decoder layer and the root HSDP over the mesh, i.e. sharded over dp and replicated over ep, as
    ``plan_memory`` places them) -> to_empty."""
    model = automodel_plugins.build_model(path, dequantize=dequantize, dtype=DTYPE)
    applied = automodel_plugins.parallelize_experts(model, ep_mesh)
    if fsdp is not None:
        from torch.distributed.fsdp import fully_shard

        automodel_plugins.fully_shard_experts(model, fsdp["dp"])
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=fsdp)
        fully_shard(model, mesh=fsdp)
    model.to_empty(device="cpu")
    return model, applied


def _expert_of(key: str) -> int | None:
    found = _EXPERT_KEY.search(key)
    return None if found is None else int(found.group(1))


def read_facts(reads: list, path: Path) -> dict[str, Any]:
    """Bytes of expert codes and of expert scales this rank read, against the checkpoint's totals; the experts
    whose pieces it opened."""
    codes = scales = 0
    opened: set[int] = set()
    with Checkpoint.open(path) as opened_checkpoint:
        for key, bounds in reads:
            if ".experts." not in key and not key.startswith("layers."):
                continue
            if "experts" not in key or "shared_experts" in key or "activation" in key:
                continue  # a static activation scale ([E] fp32) is read whole, and not counted in the total
            nbytes = _checks._read_bytes(opened_checkpoint, key, bounds)
            if "scale" in key:
                scales += nbytes
            else:
                codes += nbytes
            expert = _expert_of(key)
            if expert is not None:
                opened.add(expert)
        total_codes = total_scales = 0
        for key in opened_checkpoint:
            if "experts" not in key or "shared_experts" in key or "activation" in key or "input_scale" in key:
                continue
            nbytes = opened_checkpoint.info(key).nbytes
            if "scale" in key:
                total_scales += nbytes
            else:
                total_codes += nbytes
    return {
        "expert_code_bytes_read": codes,
        "expert_scale_bytes_read": scales,
        "expert_code_bytes": total_codes,
        "expert_scale_bytes": total_scales,
        "experts_opened": sorted(opened),
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _scale_of(reference: torch.Tensor) -> float:
    return max(reference.detach().float().abs().max().item(), 1e-12)


def ep_scenario(ctx: Any, name: str, *, dequantize: bool) -> dict[str, Any]:
    """Load split by expert with every read recorded; this rank's tensors against the single-process load; logits
    on this rank's batch; gradients of a step over every rank's batch (experts included where dequantized) and,
    dequantized, the loss after an SGD step, against one process on the mean of the ranks' losses."""
    path = checkpoint(ctx, name)
    single = automodel_plugins.from_pretrained(path, dequantize=dequantize, dtype=DTYPE)
    model, applied = ep_model(path, ctx.mesh, dequantize=dequantize)
    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path)
    result: dict[str, Any] = {"applied": applied, "bytes_read": report.bytes_read}
    result.update(read_facts(reads, path))
    result.update(
        plan_facts(path, report, model, dequantize=dequantize, ep=ctx.world, coordinate=(0, ctx.rank, 0))
    )
    tensors = model_tensors(model)
    result["local_mismatches"] = _checks.local_mismatches(model, model_tensors(single))
    result["resident_experts"] = sum(isinstance(m, Fp8Experts) for m in model.modules())
    result["expert_regions"] = {
        n: _checks.chunk_bounds(t) for n, t in tensors.items() if ".experts." in n and ".layers.1." in n
    }
    result["held_expert_bytes"] = sum(
        _checks.local_value(t).nbytes for n, t in tensors.items() if ".experts." in n and "shared" not in n
    )
    result["single_expert_bytes"] = sum(
        t.nbytes for n, t in model_tensors(single).items() if ".experts." in n and "shared" not in n
    )
    result.update(source_save(ctx, model, path, f"ep-save-{name}-{'bf16' if dequantize else 'fp8'}"))
    runs = batches(single, name, ctx.world)
    mine = runs[ctx.rank]
    model.eval(), single.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in mine.items() if k != "labels"}
        got, want = model(**inputs).logits, single(**inputs).logits
    result["logits_max_diff"], result["logits_scale"] = _max_diff(got, want), _scale_of(want)
    # the stock default above (grouped_mm); the eager loop too, on both sides
    _experts_implementation(model, "eager"), _experts_implementation(single, "eager")
    with torch.no_grad():
        result["eager_logits_max_diff"] = _max_diff(model(**inputs).logits, single(**inputs).logits)
    _experts_implementation(model, "grouped_mm"), _experts_implementation(single, "grouped_mm")
    result.update(_step(ctx, model, single, runs, sgd=dequantize))
    return result


def _attention_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )


def ep_lora(ctx: Any, name: str) -> dict[str, Any]:
    """LoRA on the attention of an FP8-resident MoE whose experts are split by expert (PEFT first, on meta, then
    ``parallelize_experts``, which finds the experts under the PEFT model): the adapters' gradients (they reach
    the first layer's attention through the second layer's dispatched experts) and the loss after an SGD step
    against one process with the same adapters on the mean of the ranks' losses."""
    path = checkpoint(ctx, name)
    single = _attention_lora(automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE))
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    model = _attention_lora(automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE))
    applied = automodel_plugins.parallelize_experts(model, ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.copy_(initial[pname])
    runs = batches(single, name, ctx.world)
    result: dict[str, Any] = {"applied": applied}
    result.update(_step(ctx, model, single, runs, sgd=True))
    return result


def source_save(ctx: Any, model: Any, path: Path, folder: str) -> dict[str, Any]:
    """A save in the source format from every rank right after the load: the keys whose stored bytes differ
    from the source checkpoint's (rank 0 compares), or the error."""
    from safetensors import safe_open

    out = ctx.out / folder
    try:
        automodel_plugins.save_pretrained(model, out)
    except Exception as exc:
        return {"save_error": f"{type(exc).__name__}: {exc}"}
    dist.barrier()
    if ctx.rank:
        return {"save_error": None}

    def stored(directory: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
        return tensors

    saved, source = stored(out), stored(path)
    different = sorted(
        key
        for key in source.keys() | saved.keys()
        if key not in saved
        or key not in source
        or not torch.equal(
            saved[key].reshape(-1).view(torch.uint8), source[key].reshape(-1).view(torch.uint8)
        )
    )
    return {"save_error": None, "save_different": different, "save_keys": len(saved)}


def _experts_implementation(model: Any, name: str) -> None:
    """What the experts' forward runs, on every experts module's config (Mistral3's VLM has no
    ``set_experts_implementation``; the experts read their text config at every call)."""
    for module in model.modules():
        if "experts" in type(module).__name__.lower() and hasattr(module, "config"):
            module.config._experts_implementation = name


def _step(ctx: Any, model: Any, single: Any, runs: list, *, sgd: bool) -> dict[str, Any]:
    """One backward (and, dequantized, one SGD step) on 2 ranks against one process on the mean loss: a replicated
    parameter's gradient is this rank's batch's (averaged over the ranks here), an expert's (a DTensor) already
    sums every rank's tokens (divided by the ranks here)."""
    model.train(), single.train()
    loss = model(**runs[ctx.rank]).loss
    loss.backward()
    single_loss = sum(single(**batch).loss for batch in runs) / len(runs)
    single_loss.backward()
    single_params = dict(single.named_parameters())
    averaged, diffs = {}, {}
    for pname, param in model.named_parameters():
        if param.grad is None:
            continue
        if _checks.is_dtensor(param.grad):
            averaged[pname] = param.grad.to_local() / ctx.world
            want = _checks.local_part(param, single_params[pname].grad)
        else:
            averaged[pname] = param.grad.clone()
            dist.all_reduce(averaged[pname])
            averaged[pname] /= ctx.world
            want = single_params[pname].grad
        diffs[pname] = _max_diff(averaged[pname], want) / _scale_of(want)
    result = {
        "grad_names": sorted(diffs),
        "single_grad_names": sorted(n for n, p in single_params.items() if p.grad is not None),
        "expert_grads": sum(_checks.is_dtensor(p.grad) for p in model.parameters() if p.grad is not None),
        "max_grad_rel_diff": max(diffs.values()),
        "worst_grad": max(diffs, key=diffs.get),
        "loss": _mean(ctx, loss.item()),
        "single_loss": single_loss.item(),
    }
    if sgd:
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname in averaged:
                    _checks.local_value(param).sub_(0.5 * averaged[pname])
            for param in single.parameters():
                if param.grad is not None:
                    param.sub_(0.5 * param.grad)
            result["loss_after"] = _mean(ctx, model(**runs[ctx.rank]).loss.item())
            result["single_loss_after"] = (sum(single(**b).loss for b in runs) / len(runs)).item()
    return result


def _mean(ctx: Any, value: float) -> float:
    total = torch.tensor([value])
    dist.all_reduce(total)
    return total.item() / ctx.world


def held_by_kind(model: Any) -> dict[str, int]:
    """Bytes of this rank's local parameter shards and persistent buffers by kind, as ``plan_memory`` names them:
    FP8-resident codes (``Fp8Linear`` weights, ``Fp8Experts``' fused tensors), their fp32 scales, every other
    tensor by dtype."""
    from automodel_plugins.model.fp8_resident import Fp8Resident

    codes = {
        id(getattr(m, name)) for m in model.modules() if isinstance(m, Fp8Resident) for name in m.CODE_NAMES
    }
    held: dict[str, int] = {}
    for name, tensor in model_tensors(model).items():
        local = _checks.local_value(tensor)
        kind = (
            "fp8_codes"
            if id(tensor) in codes
            else "scales"
            if name.endswith(("_scale_inv", "activation_scale"))
            else str(local.dtype).removeprefix("torch.")
        )
        held[kind] = held.get(kind, 0) + local.numel() * local.element_size()
    return held


def plan_facts(
    path: Path, report: Any, model: Any, *, dequantize: bool, coordinate: tuple[int, int, int], **degrees: int
) -> dict[str, Any]:
    """``plan_memory`` (headers only) for this layout, the planned rank at ``coordinate`` against what this rank
    read (the reader's counter) and holds."""
    from automodel_plugins.pipeline.load.memory_plan import plan_memory

    plan = plan_memory(path, dequantize=dequantize, dtype=DTYPE, **degrees)
    (mine,) = [rank for rank in plan.ranks if rank.coordinate == coordinate]
    return {
        "measured_read": report.bytes_read,
        "measured_held": held_by_kind(model),
        "planned_read": mine.read,
        "planned_held": dict(mine.held),
    }


def ep_shared_batch(ctx: Any, name: str) -> dict[str, Any]:
    """Every rank the same batch (``tp_mesh`` = the EP mesh, transformers' meaning: the ranks sharing one batch):
    at inference ``AutoEP`` runs its all-reduce (each rank its experts on the whole batch, other ranks' routes
    masked with the sentinel id the experts' forward skips), in training its all-to-all over slices of the batch;
    logits and gradients against one process on that batch."""
    path = checkpoint(ctx, name)
    single = automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE)
    model = automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE)
    automodel_plugins.parallelize_experts(model, ctx.mesh, tp_mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    batch = batches(single, name, 1)[0]
    model.eval(), single.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        got, want = model(**inputs).logits, single(**inputs).logits
    result: dict[str, Any] = {"logits_max_diff": _max_diff(got, want), "logits_scale": _scale_of(want)}
    model.train(), single.train()
    model(**batch).loss.backward()
    single(**batch).loss.backward()
    single_params = dict(single.named_parameters())
    diffs = {
        n: _max_diff(p.grad, single_params[n].grad) / _scale_of(single_params[n].grad)
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    result.update(
        max_grad_rel_diff=max(diffs.values()), worst_grad=max(diffs, key=diffs.get), grads=len(diffs)
    )
    return result


def ep_refusals(ctx: Any) -> dict[str, Any]:
    """What is refused, by name: 5 experts on 2 ranks; a model already FSDP2-sharded; a 2-D mesh."""
    from torch.distributed.fsdp import fully_shard

    from distributed import _tiny

    out: dict[str, Any] = {}
    model = automodel_plugins.build_model(ctx.checkpoint(_tiny.MOE_ALIGNED), dequantize=False)
    out["uneven"] = _error(lambda: automodel_plugins.parallelize_experts(model, ctx.mesh))
    path = checkpoint(ctx, QWEN)
    model = automodel_plugins.build_model(path)
    fully_shard(model.model.language_model.layers[0], mesh=ctx.mesh)
    out["after_fsdp"] = _error(lambda: automodel_plugins.parallelize_experts(model, ctx.mesh))
    from torch.distributed.device_mesh import init_device_mesh

    square = init_device_mesh("cpu", (1, ctx.world), mesh_dim_names=("dp", "ep"))
    out["two_dims"] = _error(lambda: automodel_plugins.parallelize_experts(model, square))
    return out


def _error(call: Any) -> str | None:
    try:
        call()
    except ExpertParallelError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ep_fsdp(ctx: Any, name: str, *, dequantize: bool) -> dict[str, Any]:
    """4 ranks, mesh (dp=2, ep=2): the experts split by expert over ep and FSDP2-sharded over dp (one expert of 4
    a rank), the rest HSDP; reads, gathered tensors, logits and FSDP2's averaged gradients against one process."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, ctx.world // 2), mesh_dim_names=("ep", "dp"))
    path = checkpoint(ctx, name)
    single = automodel_plugins.from_pretrained(path, dequantize=dequantize, dtype=DTYPE)
    model, applied = ep_model(path, mesh["ep"], dequantize=dequantize, fsdp=mesh)
    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path)
    ep, dp = mesh.get_coordinate()
    result: dict[str, Any] = {"applied": applied, "ep": ep, "dp": dp}
    result.update(read_facts(reads, path))
    result.update(
        plan_facts(
            path, report, model, dequantize=dequantize, fsdp=ctx.world // 2, ep=2, coordinate=(dp, ep, 0)
        )
    )
    tensors = model_tensors(model)
    gathered = {n: _checks.full_value(t) for n, t in tensors.items()}
    result["full_mismatches"] = _checks.mismatches(gathered, model_tensors(single))
    result["held_expert_bytes"] = sum(
        _checks.local_value(t).nbytes for n, t in tensors.items() if ".experts." in n and "shared" not in n
    )
    result["single_expert_bytes"] = sum(
        t.nbytes for n, t in model_tensors(single).items() if ".experts." in n and "shared" not in n
    )
    runs = batches(single, name, ctx.world)
    model.train(), single.train()
    loss = model(**runs[ctx.rank]).loss
    loss.backward()
    single_loss = sum(single(**batch).loss for batch in runs) / len(runs)
    single_loss.backward()
    single_params = dict(single.named_parameters())
    diffs = {}
    for pname, param in model.named_parameters():
        if param.grad is not None:
            want = single_params[pname].grad
            diffs[pname] = _max_diff(_checks.full_value(param.grad), want) / _scale_of(want)
    losses = torch.tensor([loss.item()])
    dist.all_reduce(losses)
    result.update(
        grad_names=sorted(diffs),
        single_grad_names=sorted(n for n, p in single_params.items() if p.grad is not None),
        max_grad_rel_diff=max(diffs.values()),
        worst_grad=max(diffs, key=diffs.get),
        loss=losses.item() / ctx.world,
        single_loss=single_loss.item(),
    )
    return result


SCENARIOS = {
    "ep_qwen_resident": lambda ctx: ep_scenario(ctx, QWEN, dequantize=False),
    "ep_qwen_dequantized": lambda ctx: ep_scenario(ctx, QWEN, dequantize=True),
    "ep_mistral4_fused_resident": lambda ctx: ep_scenario(ctx, MISTRAL4_FUSED, dequantize=False),
    "ep_mistral4_pieces_resident": lambda ctx: ep_scenario(ctx, MISTRAL4_PIECES, dequantize=False),
    "ep_mistral4_pieces_dequantized": lambda ctx: ep_scenario(ctx, MISTRAL4_PIECES, dequantize=True),
    "ep_native_resident": lambda ctx: ep_scenario(ctx, NATIVE, dequantize=False),
    "ep_native_dequantized": lambda ctx: ep_scenario(ctx, NATIVE, dequantize=True),
    "ep_qwen_resident_lora": lambda ctx: ep_lora(ctx, QWEN),
    "ep_native_resident_lora": lambda ctx: ep_lora(ctx, NATIVE),
    "ep_shared_batch": lambda ctx: ep_shared_batch(ctx, QWEN),
    "ep_refusals": ep_refusals,
    "ep_hsdp_qwen_dequantized": lambda ctx: ep_fsdp(ctx, QWEN, dequantize=True),  # 2 ranks: (ep=2, dp=1)
    "ep_fsdp_qwen_resident": lambda ctx: ep_fsdp(ctx, QWEN, dequantize=False),
    "ep_fsdp_qwen_dequantized": lambda ctx: ep_fsdp(ctx, QWEN, dequantize=True),
}
