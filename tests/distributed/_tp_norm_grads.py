"""Gradients of the replicated parameters that tensor parallelism feeds only this rank's shard (Qwen3's per-head
``q_norm`` / ``k_norm`` between the column-wise q/k and the row-wise o projections), scenarios for ``_worker.py``.

A tiny Qwen3-VL-MoE (FP8-resident), split by its own ``tp_plan`` (``parallelize_fp8``), both ranks on the same
micro-batches; against one process in fp32: a full fine-tune's gradient of every trainable parameter after one
backward and after two accumulated ones (``.grad`` summed over micro-batches), with no user all-reduce; under
LoRA (base frozen) the same for the adapters. Mistral 3 and Mistral 4 (no such module in their plans) are
checked to have none found."""

from __future__ import annotations

from typing import Any

import torch

import automodel_plugins
from automodel_plugins.model.placement import is_dtensor
from distributed import _expert_parallel as ep

DTYPE = torch.float32
MICRO_BATCHES = 2


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def _rel_diffs(model: Any, single: Any) -> dict[str, float]:
    """Parameter name -> max |grad - one-process grad| / max |one-process grad| (split ones gathered)."""
    want = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    diffs = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        reference = want[name]
        scale = max(reference.abs().max().item(), 1e-12)
        diffs[name] = (_whole(param.grad).detach() - reference).abs().max().item() / scale
    return diffs


def _with_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(5)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _split(ctx: Any, path: Any, *, lora: bool) -> tuple[Any, dict[str, str]]:
    model = automodel_plugins.build_model(path, dequantize=False, dtype=DTYPE)
    if lora:
        model = _with_lora(model)
    applied = automodel_plugins.parallelize_fp8(model, ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    return model.train(), applied


def _single(path: Any, *, lora: bool) -> Any:
    model = automodel_plugins.from_pretrained(path, dequantize=False, dtype=DTYPE)
    return (_with_lora(model) if lora else model).train()


def tp_norm_grads(ctx: Any, *, lora: bool) -> dict[str, Any]:
    path = ep.checkpoint(ctx, ep.QWEN)
    single = _single(path, lora=lora)
    model, applied = _split(ctx, path, lora=lora)
    if lora:  # the same adapters on both: copy the one-process initial values into this rank's part
        whole = dict(single.named_parameters())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    _local(param).copy_(_local(_same(param, whole[name])))
    batches = ep.batches(single, ep.QWEN, MICRO_BATCHES)
    steps = []
    for batch in batches:  # gradient accumulation: .grad sums the micro-batches
        model(**batch).loss.backward()
        single(**batch).loss.backward()
        steps.append(_rel_diffs(model, single))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {
        "applied_sum": sorted(n for n, style in applied.items() if style == "ReplicateWithGradientSum"),
        "trainable": trainable,
        "grad_names": sorted(steps[0]),
        "single_grad_names": sorted(n for n, p in single.named_parameters() if p.grad is not None),
        "rel_diffs": steps,
        "grad_hooks": sum(len(p._backward_hooks or {}) for _, p in model.named_parameters()),
    }


def _same(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` laid out as ``param`` (a DTensor's placements), or ``whole``."""
    if not is_dtensor(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.detach(), param.device_mesh, param.placements)


def tp_norm_grads_found(ctx: Any) -> dict[str, Any]:
    """What ``partial_gradient_modules`` finds in the other models (on meta: no weights needed)."""
    from automodel_plugins.model.tensor_parallel import partial_gradient_modules

    found = {}
    for name in (ep.QWEN, ep.MISTRAL4_FUSED):
        model = automodel_plugins.build_model(ep.checkpoint(ctx, name), dequantize=False, dtype=DTYPE)
        found[name] = sorted(partial_gradient_modules(model))
    model = automodel_plugins.build_model(ctx.checkpoint("block_untied"), dequantize=False)
    found["mistral3"] = sorted(partial_gradient_modules(model))
    return {"found": found}


SCENARIOS = {
    "tp_norm_grads_full": lambda ctx: tp_norm_grads(ctx, lora=False),
    "tp_norm_grads_lora": lambda ctx: tp_norm_grads(ctx, lora=True),
    "tp_norm_grads_found": tp_norm_grads_found,
}
