"""Expert tensor parallelism (``automodel_plugins.parallelize_experts_tp``) scenarios for ``_worker.py``: the
FP8-resident experts (``Fp8Experts``) of a tiny Qwen3-VL-MoE (16x16 blocks, intermediate 32) and a tiny Mistral 4
(4x4 blocks, intermediate 24; per-expert block pieces) split over 2 ranks by the intermediate dim (each rank every
expert's gate rows, matching up rows and matching down columns), the rest of the model by its own ``tp_plan``
(``parallelize_fp8``). Both ranks run the same batch; everything is compared with one process holding the whole
model, in fp32: this rank's tensors bit for bit against the same indices of the whole ones, what it read, the
logits (grouped and eager experts), the gradients of every trainable (non-FP8) parameter, a source-format save
from every rank against the source bytes; and the refusals (a split cutting a scale block, LoRA on the experts,
dequantized experts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import automodel_plugins
from automodel_plugins.errors import ExpertTensorParallelError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.placement import _held_indices, is_dtensor
from automodel_plugins.model.tensors import model_tensors
from distributed import _expert_parallel as ep

DTYPE = torch.float32
MISTRAL4_ALIGNED = "etp_mistral4_pieces_block4"
GRAD_TOLERANCE = 1e-4
"""Relative to the largest gradient: fp32 sums taken in another order (the existing TP tests' bound is 2e-2)."""


def _write_mistral4_aligned(path: Path) -> None:
    """Mistral 4 per-expert block pieces in 4x4 blocks: each rank's 12 of 24 intermediate rows are 3 blocks."""
    from mistral4_checkpoints import tiny_model, write_checkpoint

    write_checkpoint(tiny_model(), path, "block-per-expert", block=(4, 4))


ep.WRITERS.setdefault(MISTRAL4_ALIGNED, _write_mistral4_aligned)


def etp_model(path: Path, mesh: Any, *, dequantize: bool = False) -> tuple[Any, dict[str, str]]:
    """build on meta -> the model's tp_plan (``parallelize_fp8``) -> expert TP -> to_empty."""
    model = automodel_plugins.build_model(path, dequantize=dequantize, dtype=DTYPE)
    automodel_plugins.parallelize_fp8(model, mesh)
    applied = automodel_plugins.parallelize_experts_tp(model, mesh)
    model.to_empty(device="cpu")
    return model, applied


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _same_indices(tensor: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The elements of ``whole`` that the DTensor ``tensor`` holds on this rank, in its local order."""
    if not is_dtensor(tensor):
        return whole
    mesh = tensor.device_mesh
    held = _held_indices(tuple(tensor.shape), tuple(mesh.shape), mesh.get_coordinate(), tensor.placements)
    for dim, indices in enumerate(held):
        whole = whole.index_select(dim, indices)
    return whole


def _mismatches(model: Any, single: Any) -> list[str]:
    expected = model_tensors(single)
    return [
        name
        for name, tensor in model_tensors(model).items()
        if not torch.equal(_local(tensor), _same_indices(tensor, expected[name]))
    ]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _batch(single: Any, name: str) -> dict[str, torch.Tensor]:
    """One batch, the same on every rank (tensor parallelism shares it)."""
    return ep.batches(single, name, 1)[0]


def etp_scenario(ctx: Any, name: str, *, dequantize: bool = False) -> dict[str, Any]:
    path = ep.checkpoint(ctx, name)
    single = automodel_plugins.from_pretrained(path, dequantize=dequantize, dtype=DTYPE)
    model, applied = etp_model(path, ctx.mesh, dequantize=dequantize)
    from distributed import _checks

    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path)
    result: dict[str, Any] = {"applied": applied, "bytes_read": report.bytes_read}
    result.update(ep.read_facts(reads, path))
    result.update(
        ep.plan_facts(
            path, report, model, dequantize=dequantize, coordinate=(0, 0, ctx.rank), tp=2, expert_tp=True
        )
    )
    result["resident_experts"] = sum(isinstance(m, Fp8Experts) for m in model.modules())
    result["local_mismatches"] = _mismatches(model, single)
    tensors = model_tensors(model)
    result["expert_placements"] = {
        n: [str(p) for p in t.placements]
        for n, t in tensors.items()
        if ".experts." in n and ".layers.1." in n and "shared" not in n and is_dtensor(t)
    }
    result["held_expert_bytes"] = sum(
        _local(t).nbytes
        for n, t in tensors.items()
        if ".experts." in n and "shared" not in n and "activation" not in n
    )
    result["single_expert_bytes"] = sum(
        t.nbytes
        for n, t in model_tensors(single).items()
        if ".experts." in n and "shared" not in n and "activation" not in n
    )
    batch = _batch(single, name)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval(), single.eval()
    for implementation in ("grouped_mm", "eager"):
        ep._experts_implementation(model, implementation), ep._experts_implementation(single, implementation)
        with torch.no_grad():
            got, want = model(**inputs).logits, single(**inputs).logits
        result[f"logits_{implementation}_diff"] = _max_diff(got, want)
        result["logits_scale"] = want.abs().max().item()
    ep._experts_implementation(model, "grouped_mm"), ep._experts_implementation(single, "grouped_mm")
    result.update(_grads(model, single, batch))
    result.update(ep.source_save(ctx, model, path, f"etp-save-{name}-{'bf16' if dequantize else 'fp8'}"))
    return result


def _grads(model: Any, single: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Full fine-tune of the non-FP8 parameters: one backward on the shared batch against one process."""
    model.train(), single.train()
    model(**batch).loss.backward()
    single(**batch).loss.backward()
    single_params = dict(single.named_parameters())
    diffs = {}
    for pname, param in model.named_parameters():
        if param.grad is None:
            continue
        want = _same_indices(param, single_params[pname].grad)
        scale = max(want.abs().max().item(), 1e-12)
        diffs[pname] = _max_diff(_local(param.grad), want) / scale
    return {
        "grad_names": sorted(diffs),
        "single_grad_names": sorted(n for n, p in single_params.items() if p.grad is not None),
        "max_grad_rel_diff": max(diffs.values()),
        "worst_grad": max(diffs, key=diffs.get),
    }


def _refused(call: Any) -> str | None:
    try:
        call()
    except ExpertTensorParallelError as exc:
        return str(exc)
    return None


def etp_refusals(ctx: Any) -> dict[str, Any]:
    """A split cutting a scale block (Mistral 4 in 8x8 blocks: 12 of 24 rows a rank), LoRA on the experts (PEFT
    before the split, FP8-resident or dequantized, or after it): each an ``ExpertTensorParallelError`` naming the tensor or module, before any change."""
    import peft

    cut = ep.checkpoint(ctx, ep.MISTRAL4_PIECES)
    qwen = ep.checkpoint(ctx, ep.QWEN)
    result: dict[str, Any] = {}
    model = automodel_plugins.build_model(cut, dequantize=False, dtype=DTYPE)
    result["block_cut"] = _refused(lambda: automodel_plugins.parallelize_experts_tp(model, ctx.mesh))
    result["block_cut_untouched"] = not any(is_dtensor(t) for t in model_tensors(model).values())
    lora = peft.get_peft_model(
        automodel_plugins.build_model(qwen, dequantize=False, dtype=DTYPE),
        peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    )
    result["lora"] = _refused(lambda: automodel_plugins.parallelize_experts_tp(lora, ctx.mesh))
    # PEFT after the split: refused at the first forward, naming the experts module
    split, _ = etp_model(qwen, ctx.mesh)
    automodel_plugins.load_weights(split, qwen)
    late = peft.get_peft_model(
        split, peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    )
    single = automodel_plugins.from_pretrained(qwen, dequantize=False, dtype=DTYPE)
    inputs = {k: v for k, v in _batch(single, ep.QWEN).items() if k != "labels"}
    result["lora_after"] = _refused(lambda: late(**inputs))
    dequantized = peft.get_peft_model(
        automodel_plugins.build_model(qwen, dequantize=True, dtype=DTYPE),
        peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    )
    result["dequantized_lora"] = _refused(
        lambda: automodel_plugins.parallelize_experts_tp(dequantized, ctx.mesh)
    )
    return result


SCENARIOS = {
    "etp_qwen_resident": lambda ctx: etp_scenario(ctx, ep.QWEN),
    "etp_mistral4_resident": lambda ctx: etp_scenario(ctx, MISTRAL4_ALIGNED),
    "etp_qwen_dequantized": lambda ctx: etp_scenario(ctx, ep.QWEN, dequantize=True),
    "etp_refusals": etp_refusals,
}
