"""Distributed load and save scenarios, one torchrun launch for all of them (2 CPU ranks, gloo).

    torchrun --nproc_per_node 2 tests/distributed/_worker.py SCENARIO[,SCENARIO...] OUT_DIR

Rank 0 writes the tiny FP8 checkpoints into ``OUT_DIR``; every rank then runs each scenario and writes what it
measured to ``OUT_DIR/results/<scenario>.rank<r>.json`` (facts, not verdicts: the pytest side asserts). A
scenario that raises writes its traceback there instead and ends the launch with a non-zero exit.

Teardown is explicit and ends with ``os._exit``, because leaving it to the interpreter aborted about one launch
in 4 to 10 on a busy machine with ``terminate called without an active exception`` (SIGABRT on one rank, after
every result was written). The process group outlives ``destroy_process_group``: gloo's ``ProcessGroupGloo``
stops its threads (two ``pt_gloo_runloop``, one ``gloo_tcp_loop``) only in its destructor, and something always
keeps it: ``torch.distributed.nn.functional`` takes ``group.WORLD`` as the default argument of its functions,
evaluated on import (``transformers.modeling_utils`` imports it through FSDP, after ``init_process_group``),
and DTensor's planning caches keep specs that hold the mesh. A run-loop thread drops its reference
to a finished collective only after the waiting main thread has woken; when that was the last one,
``~AsyncWork`` frees the work's tensors, whose Python objects need the GIL. If the main thread has meanwhile
entered ``Py_FinalizeEx``, CPython 3.11 ends that thread with ``pthread_exit``, and the forced unwind through the
``noexcept`` destructor calls ``std::terminate`` (backtrace in the issue-11 note). So each rank drops its own
references, destroys the group, flushes its output and leaves with ``os._exit``: the abort can only happen
inside interpreter finalization, which then never runs. Results are files written and renamed before; a
scenario that raises still prints its traceback and exits non-zero.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest puts it

import automodel_plugins
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.model.tensors import model_tensors
from distributed import (
    _checks,
    _compressed_tensors_save,
    _ct_state_dict,
    _ep_lora,
    _ep_lora_shard,
    _expert_parallel,
    _experts_lora,
    _experts_tp,
    _fsdp_save_config,
    _mistral4,
    _native,
    _native_save,
    _peft_merge_config,
    _rotary_compile,
    _source_save_dtype,
    _stages,
    _tiny,
    _tp_norm_grads,
)

CHECKPOINTS = {  # name -> (block size, tied embeddings)
    "per_tensor_tied": (None, True),
    "per_tensor_untied": (None, False),
    "block_untied": (_tiny.BLOCK, False),
    "block4_untied": (_tiny.ALIGNED_BLOCK, False),
}
_NOT_WEIGHTS = ("_scale_inv", "activation_scale")  # key suffixes of scales, not weights


@dataclass
class Context:
    rank: int
    world: int
    mesh: Any
    out: Path

    def checkpoint(self, name: str) -> Path:
        return self.out / f"ckpt-{name}"


# --- shared steps ------------------------------------------------------------------------------------------


def fsdp_model(ctx: Context, path: Path) -> Any:
    """The issue's flow up to the load: build on meta, shard every layer and the root, materialize."""
    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(path)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    return model


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a VLM (``model.language_model.layers``) or of a text-only model (``model.layers``)."""
    base = model.model
    return base.language_model.layers if hasattr(base, "language_model") else base.layers


def load_recorded(model: Any, path: Path, *, stage: bool = False, rename: Any = None) -> dict[str, Any]:
    """``load_weights`` with every checkpoint read recorded, against what this rank should read (``rename``:
    model name -> checkpoint key, the legacy Mistral3 layout by default)."""
    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path, stage=stage)
    with Checkpoint.open(path) as checkpoint:
        expected, expected_bytes = _checks.expected_reads(model, checkpoint, rename or _tiny.legacy_rename)
        scales = ("_scale_inv", "activation_scale")  # weight scales, and the static activation scales kept
        scale_bytes = sum(checkpoint.info(key).nbytes for key, _ in reads if key.endswith(scales))
        weight_bytes = sum(checkpoint.info(k).nbytes for k in checkpoint if not k.endswith(_NOT_WEIGHTS))
    return {
        "bytes_read": report.bytes_read,
        "expected_bytes": expected_bytes,
        "scale_bytes_read": scale_bytes,
        "checkpoint_weight_bytes": weight_bytes,
        "reads": _checks.sorted_reads(reads),
        "expected_reads": expected,
        "tensors": report.tensors,
        "dequantized": report.dequantized,
        "kept_fp8": report.kept_fp8,
    }


def full_state_mismatches(model: Any, reference: Any) -> list[str]:
    """Gather every tensor of the state dict (``full_tensor()``) and compare with the reference's, bit for bit."""
    gathered = {name: _checks.full_value(t) for name, t in model.state_dict().items()}
    return _checks.mismatches(gathered, reference.state_dict())


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def rotary_mismatches(model: Any, reference: Any) -> list[str]:
    """The model's rotary buffers (all it holds: a stage holds some) that differ from the reference's."""
    mine = _checks.rotary_buffers(model)
    theirs = {name: t for name, t in _checks.rotary_buffers(reference).items() if name in mine}
    return _checks.mismatches(mine, theirs)


# --- scenarios ---------------------------------------------------------------------------------------------


def fsdp_load(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """FSDP2-sharded load; gathered state dict, rotary buffers and logits against the single-process load."""
    path = ctx.checkpoint(checkpoint)
    reference = _tiny.reference(path)
    model = fsdp_model(ctx, path)
    result = load_recorded(model, path)
    sharded = model_tensors(model)
    result["plain_tensors"] = sorted(name for name, t in sharded.items() if not _checks.is_dtensor(t))
    result["uneven"] = sorted(
        name for name, t in sharded.items() if t.shape[0] % ctx.world and _checks.is_dtensor(t)
    )
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["full_mismatches"] = full_state_mismatches(model, reference)
    result["rotary_after_load"] = rotary_mismatches(model, reference)
    # to_empty-style garbage in the rotary buffers: the per-rotary hook must repair them at the first forward.
    result["garbled_rotary_buffers"] = _checks.garble_rotary(model)
    model.eval()
    batch = _tiny.inputs()
    result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))
    result["rotary_after_forward"] = rotary_mismatches(model, reference)
    return result


def fsdp_text_only(ctx: Context) -> dict[str, Any]:
    """Text-only Ministral 3 (Devstral 2's class), the issue's FSDP2 flow: each rank reads its slices; gathered
    weights, rotary buffers, logits and two fused-loss SGD steps equal the single-process load's."""
    path = ctx.checkpoint(_tiny.TEXT_ONLY)
    reference = _tiny.reference(path)
    model = fsdp_model(ctx, path)
    result = load_recorded(model, path, rename=lambda name: name)
    result["plain_tensors"] = sorted(n for n, t in model_tensors(model).items() if not _checks.is_dtensor(t))
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["full_mismatches"] = full_state_mismatches(model, reference)
    result["rotary_after_load"] = rotary_mismatches(model, reference)
    result["garbled_rotary_buffers"] = _checks.garble_rotary(model)
    model.eval()
    batch = _tiny.text_inputs()
    result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))
    result["rotary_after_forward"] = rotary_mismatches(model, reference)
    model.reshard()  # the root unit stays unsharded after a forward: the optimizer must see the shards
    model.train(), reference.train()
    for label, module in (("losses", model), ("reference_losses", reference)):
        result[label], result[f"{label}_logits"] = _train(module, batch, steps=2)
    result["updated_mismatches"] = full_state_mismatches(model, reference)
    return result


def fsdp_native(ctx: Context) -> dict[str, Any]:
    """A Mistral-native FP8 checkpoint in the FSDP2 flow: q/k rows are permuted from Mistral's rotary order, so
    each rank reads the whole rows of its q/k pieces (a head's rows are spread over them) and keeps its shard;
    gathered weights and logits (with an image) equal the single-process load's; then a native save."""
    path = ctx.checkpoint(_tiny.NATIVE)
    reference = _tiny.reference(path)
    model = fsdp_model(ctx, path)
    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path)
    watched = ("layers.0.attention.wq.weight", "layers.0.attention.wv.weight")
    result = {
        "dequantized": report.dequantized,
        "bounds": {key: [bounds for k, bounds in reads if k == key] for key in watched},
        "rows": {key: Checkpoint.open(path).info(key).shape[0] for key in watched},
    }
    result["plain_tensors"] = sorted(n for n, t in model_tensors(model).items() if not _checks.is_dtensor(t))
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["full_mismatches"] = full_state_mismatches(model, reference)
    model.eval()
    batch = _tiny.inputs()
    result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))
    model.reshard()
    try:
        automodel_plugins.save_pretrained(model, ctx.out / "native-fsdp-save")
        result["save_error"] = None
    except Exception as exc:
        result["save_error"] = f"{type(exc).__name__}: {exc}"
    return result


# --- mixture of experts: fused expert parameters assembled from per-expert FP8 pieces ----------------------


def moe_facts(ctx: Context, model: Any, path: Path, reference: Any, *, forward: bool) -> dict[str, Any]:
    """Load with every read recorded; local and gathered tensors, rotary buffers and (with ``forward``: FSDP2
    runs the stock forward, a bare DTensor layout does not) logits with an image, against the single-process
    load."""
    result = load_recorded(model, path, rename=lambda name: name)
    result["pieces"] = model.automodel_composition.load.pieces
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["full_mismatches"] = full_state_mismatches(model, reference)
    result["rotary_after_load"] = rotary_mismatches(model, reference)
    if forward:
        model.eval()
        batch = _tiny.moe_inputs()
        result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))
    experts = "model.language_model.layers.0.mlp.experts."
    result["expert_regions"] = {
        name: _checks.chunk_bounds(t) for name, t in model_tensors(model).items() if name.startswith(experts)
    }
    return result


def moe_fsdp(ctx: Context) -> dict[str, Any]:
    """The FSDP2 flow on a Qwen3-VL-MoE: each rank reads only the experts of its dim-0 shard (whole pieces),
    then two fused-loss SGD steps and a save in the source format."""
    path = ctx.checkpoint(_tiny.MOE)
    reference = _tiny.reference(path)
    model = fsdp_model(ctx, path)
    result = moe_facts(ctx, model, path, reference, forward=True)
    # The root unit stays unsharded after a forward: the save and the optimizer must see the shards.
    model.reshard()
    result["plain_tensors"] = sorted(n for n, t in model_tensors(model).items() if not _checks.is_dtensor(t))
    save = automodel_plugins.save_pretrained(model, ctx.out / "moe-fsdp-save")
    result["save"] = {"bytes_written_by_rank": save.bytes_written_by_rank, "scales_kept": save.scales_kept}
    model.train(), reference.train()
    batch = _tiny.moe_inputs()
    for label, module in (("losses", model), ("reference_losses", reference)):
        result[label], result[f"{label}_logits"] = _train(module, batch, steps=2)
    result["updated_mismatches"] = full_state_mismatches(model, reference)
    return result


def moe_distributed(ctx: Context, expert_dim: int) -> dict[str, Any]:
    """Expert parameters ``distribute_tensor``-ed ``Shard(expert_dim)`` (0: expert parallelism, each rank its
    experts; 1: rows of every expert), every other parameter replicated."""
    from torch import nn
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    path = ctx.checkpoint(_tiny.MOE)
    reference = _tiny.reference(path)
    model = automodel_plugins.build_model(path)
    for name, param in list(model.named_parameters()):
        expert = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        placement = Shard(expert_dim) if expert else Replicate()
        module_name, _, leaf = name.rpartition(".")
        value = distribute_tensor(param.detach(), ctx.mesh, [placement])
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(
            value, requires_grad=param.requires_grad
        )
    model.to_empty(device="cpu")
    return moe_facts(ctx, model, path, reference, forward=False)


def tp_load(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """Tensor-parallel layout (``distribute_tensor``, Shard(0)/Shard(1)/Replicate, uneven): exact shards."""
    path = ctx.checkpoint(checkpoint)
    reference = _tiny.reference(path)
    model = automodel_plugins.build_model(path)
    _stages.distribute_parameters(model, ctx.mesh)
    model.to_empty(device="cpu")
    result = load_recorded(model, path)
    placements = {name: [repr(p) for p in t.placements] for name, t in model_tensors(model).items()}
    result["placements"] = sorted({p for ps in placements.values() for p in ps})
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["full_mismatches"] = full_state_mismatches(model, reference)
    result["rotary_after_load"] = rotary_mismatches(model, reference)
    return result


def pipeline(ctx: Context) -> dict[str, Any]:
    """Two stages: each rank loads and reads only what its stage holds, and runs its sub-modules directly."""
    path = ctx.checkpoint("per_tensor_untied")
    reference = _tiny.reference(path)
    model = _stages.make_stage(automodel_plugins.build_model(path), ctx.rank)
    model.to_empty(device="cpu")
    result = load_recorded(model, path, stage=True)
    with Checkpoint.open(path) as checkpoint:
        result["checkpoint_keys"] = sorted(k for k in checkpoint if not k.endswith("activation_scale"))
    result["local_mismatches"] = _checks.local_mismatches(model, reference.state_dict())
    result["rotary_after_load"] = rotary_mismatches(model, reference)
    result["rotary_buffers"] = sorted(_checks.rotary_buffers(model))
    result["garbled_rotary_buffers"] = _checks.garble_rotary(model)
    model.eval()
    batch = _tiny.inputs()
    hidden, reference_logits = _stages.reference_split(reference, batch)
    if ctx.rank == 0:
        mine = _stages.run_stage0(model, batch)
        dist.send(mine.contiguous(), dst=1)
        result["stage_output_equal"] = bool(torch.equal(mine, hidden))
    else:
        received = torch.empty_like(hidden)
        dist.recv(received, src=0)
        result["stage_output_equal"] = bool(
            torch.equal(_stages.run_stage1(model, received), reference_logits)
        )
    result["rotary_after_forward"] = rotary_mismatches(model, reference)
    return result


def hub_fsdp(ctx: Context) -> dict[str, Any]:
    """The FSDP2 flow from a hub repo id: both ranks build and load from it, one of them downloads."""
    repo = _tiny.HUB_REPOS["hub_fsdp"]
    reference = _tiny.reference(ctx.out / _tiny.HUB_SOURCE)
    model = fsdp_model(ctx, repo)
    report = automodel_plugins.load_weights(model, repo)
    return {
        "tensors": report.tensors,
        "name_or_path": model.config.name_or_path,
        "local_mismatches": _checks.local_mismatches(model, reference.state_dict()),
        "full_mismatches": full_state_mismatches(model, reference),
    }


def hub_pipeline(ctx: Context) -> dict[str, Any]:
    """Two pipeline stages loading from a hub repo id: headers read once, each shard downloaded once."""
    repo = _tiny.HUB_REPOS["hub_pipeline"]
    reference = _tiny.reference(ctx.out / _tiny.HUB_SOURCE)
    model = _stages.make_stage(automodel_plugins.build_model(repo), ctx.rank)
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, repo, stage=True)
    return {
        "tensors": report.tensors,
        "local_mismatches": _checks.local_mismatches(model, reference.state_dict()),
    }


def hub_one_rank(ctx: Context) -> dict[str, Any]:
    """Only rank 0 loads a repo id, with ``collective=False``: it downloads on its own while rank 1 makes no
    call at all (a collective load would wait for rank 1 until the download timeout)."""
    if ctx.rank != 0:
        return {"loaded": False}
    repo = _tiny.HUB_REPOS["hub_one_rank"]
    reference = _tiny.reference(ctx.out / _tiny.HUB_SOURCE)
    model = automodel_plugins.from_pretrained(repo, collective=False)
    return {
        "loaded": True,
        "tensors": len(model.state_dict()),
        "local_mismatches": _checks.local_mismatches(model, reference.state_dict()),
    }


def train_step(ctx: Context) -> dict[str, Any]:
    """Two SGD steps with FSDP2 and the fused loss (``lm_head`` managed by the root unit) vs one process.

    Both ranks take the same batch, so the averaged gradient equals the single process's bit for bit.
    """
    path = ctx.checkpoint("per_tensor_untied")
    batch = _tiny.inputs()
    reference = _tiny.reference(path).train()
    model = fsdp_model(ctx, path)
    automodel_plugins.load_weights(model, path)
    model.train()
    before = {name: t.detach().clone() for name, t in reference.state_dict().items()}
    result: dict[str, Any] = {"head_sharded_at_rest": _checks.is_dtensor(model.lm_head.weight)}
    for label, module in (("losses", model), ("reference_losses", reference)):
        result[label], result[f"{label}_logits"] = _train(module, batch, steps=2)
    result["params_changed"] = sorted(
        name for name, t in reference.state_dict().items() if not torch.equal(before[name], t)
    )
    result["updated_mismatches"] = full_state_mismatches(model, reference)
    return result


def _train(model: Any, batch: dict[str, torch.Tensor], *, steps: int) -> tuple[list[float], list[bool]]:
    """Losses of ``steps`` forward+backward+SGD steps, and whether each forward returned logits.

    The optimizer is made before any forward: FSDP2 keeps the root unit unsharded after its forward, when
    ``model.parameters()`` would hand out the temporary unsharded tensors.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, had_logits = [], []
    for _ in range(steps):
        out = model(**batch, skip_logits=True)
        losses.append(out.loss.item())
        had_logits.append(out.logits is not None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return losses, had_logits


# --- lm_head under FSDP2 hooks of its own: accelerate's layout and the ones fully_shard reaches ------------


def accelerate_fsdp2(ctx: Context, model: Any) -> Any:
    """accelerate 1.16's own ``fsdp2_prepare_model`` on ``model``, with its default FSDP2 plugin settings
    (transformer-based wrap of ``_no_split_modules``, ``reshard_after_forward=True``, no mixed precision).

    On CPU ``Accelerator(fsdp_plugin=...)`` silently prepares DDP instead, so the function gets the few
    attributes of an ``Accelerator`` it reads; the ``fully_shard`` calls are accelerate's own: every decoder
    (and vision) layer, the input embeddings, the tail ``[final_norm, lm_head]`` with
    ``reshard_after_forward=False`` (``lm_head`` alone when the final norm is not a direct child of the base
    model, as on Mistral3's VLM; with the embeddings when tied), then the root.
    """
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=ctx.rank == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, model)


def head_groups(model: Any) -> list[dict[str, Any]]:
    """The FSDP2 groups holding ``lm_head`` (by module name) and their ``reshard_after_forward``."""
    from torch.distributed.fsdp import FSDPModule

    names = {module: name for name, module in model.named_modules()}
    groups = []
    if isinstance(model.lm_head, FSDPModule):
        state = model.lm_head._get_fsdp_state()
        for group in state._fsdp_param_groups:
            groups.append(
                {
                    "modules": sorted(names[m] for m in state._modules),
                    "reshard_after_forward": bool(group.post_forward_mesh_info is not None),
                }
            )
    return groups


def head_parameter_name(model: Any) -> str:
    """The name ``named_parameters`` gives ``lm_head.weight`` (the first of its names: tied, the embeddings')."""
    weight = model.lm_head.weight
    return next(name for name, param in model.named_parameters() if param is weight)


def _user_head_layout(ctx: Context, path: Path, layout: str) -> Any:
    """Layouts a user reaches with ``fully_shard``: every decoder layer, then ``lm_head`` alone or with the
    final norm, ``reshard_after_forward`` True or False, inside the root; built on meta, then loaded.
    ``head_output_bf16``: FSDP2 casts what ``lm_head`` returns to bf16, which would round a fused loss."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = automodel_plugins.build_model(path, dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=ctx.mesh)
    reshard = layout.endswith("_reshard")
    norm = model.model.language_model.norm
    tail = [norm, model.lm_head] if layout.startswith("norm_head") else model.lm_head
    policy = MixedPrecisionPolicy(output_dtype=torch.bfloat16 if layout == "head_output_bf16" else None)
    fully_shard(tail, mesh=ctx.mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    return model


def _train_recorded(
    model: Any, batch: dict[str, torch.Tensor], *, steps: int, skip_logits: bool | None
) -> dict[str, Any]:
    """``steps`` SGD steps: each loss, whether logits came back, the UserWarnings, the full gradients of the
    first step and the full parameters after the last (the optimizer made before any forward, see ``_train``)."""
    import warnings

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    extra = {} if skip_logits is None else {"skip_logits": skip_logits}
    losses, had_logits, grads = [], [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            out = model(**batch, **extra)
            losses.append(out.loss.item())
            had_logits.append(out.logits is not None)
            optimizer.zero_grad()
            out.loss.backward()
            if step == 0:
                grads = {
                    n: _checks.full_value(p.grad) for n, p in model.named_parameters() if p.grad is not None
                }
            optimizer.step()
    params = {n: _checks.full_value(p).detach() for n, p in model.named_parameters()}
    return {
        "losses": losses,
        "had_logits": had_logits,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "grads": grads,
        "params": params,
    }


def _stock_reference(path: Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The stock forward (full logits, transformers' loss) of the single-process load, trained the same way
    (fp32 throughout, so that bf16 rounding of stock's logits does not blur the comparison)."""
    reference = automodel_plugins.from_pretrained(path, dtype=torch.float32).train()
    del reference.forward  # the instance's fused-loss forward: back to the class's stock one
    return _train_recorded(reference, batch, steps=2, skip_logits=None)


def _head_facts(model: Any, batch: dict[str, torch.Tensor], reference: dict[str, Any]) -> dict[str, Any]:
    """Train ``model`` with ``skip_logits=True`` and compare loss, gradients and updated weights with the stock
    reference."""
    facts: dict[str, Any] = {
        "groups": head_groups(model),
        "head_sharded_at_rest": _checks.is_dtensor(model.lm_head.weight),
    }
    model.train()
    got = _train_recorded(model, batch, steps=2, skip_logits=True)
    facts.update(losses=got["losses"], had_logits=got["had_logits"], warnings=got["warnings"])
    facts["reference_losses"] = reference["losses"]
    facts["grad_names"] = sorted(got["grads"])
    facts["reference_grad_names"] = sorted(reference["grads"])
    shared = set(got["grads"]) & set(reference["grads"])
    facts["max_grad_diff"] = max((got["grads"][n] - reference["grads"][n]).abs().max().item() for n in shared)
    head = head_parameter_name(model)  # the embeddings' name when tied
    facts["head_parameter"] = head
    facts["head_grad_diff"] = (got["grads"][head] - reference["grads"][head]).abs().max().item()
    facts["max_param_diff"] = max(
        (got["params"][n] - reference["params"][n]).abs().max().item() for n in reference["params"]
    )
    return facts


def accelerate_head(ctx: Context) -> dict[str, Any]:
    """accelerate's FSDP2 layout on a model loaded by ``from_pretrained`` (the VLM, tied and untied, and the
    text-only model, whose final norm joins ``lm_head``'s group): the fused loss runs (no logits, no warning),
    and loss, gradients and updated weights equal the stock loss with full logits in one process."""
    result = {}
    cases = (("vlm_untied", "per_tensor_untied", _tiny.inputs), ("vlm_tied", "per_tensor_tied", _tiny.inputs))
    cases += (("text_only", _tiny.TEXT_ONLY, _tiny.text_inputs),)
    for name, checkpoint, make_batch in cases:
        path, batch = ctx.checkpoint(checkpoint), make_batch()
        reference = _stock_reference(path, batch)
        model = accelerate_fsdp2(ctx, automodel_plugins.from_pretrained(path, dtype=torch.float32))
        result[name] = _head_facts(model, batch, reference)
    return result


USER_HEAD_LAYOUTS = ("head", "head_reshard", "norm_head", "norm_head_reshard")


def fsdp_head_layouts(ctx: Context) -> dict[str, Any]:
    """``lm_head`` in an FSDP2 unit of its own, alone or with the final norm, ``reshard_after_forward`` False or
    True, inside the root: the fused loss runs and equals the stock loss, gradients and update."""
    path, batch = ctx.checkpoint("per_tensor_untied"), _tiny.inputs()
    reference = _stock_reference(path, batch)
    result = {
        layout: _head_facts(_user_head_layout(ctx, path, layout), batch, reference)
        for layout in USER_HEAD_LAYOUTS
    }
    cast = _user_head_layout(ctx, path, "head_output_bf16").train()
    facts = _train_recorded(cast, batch, steps=1, skip_logits=True)
    result["head_output_bf16"] = {k: facts[k] for k in ("losses", "had_logits", "warnings")}
    return result


# --- FP8-resident weights (dequantize=False) ------------------------------------------------------------


def fsdp_resident_model(ctx: Context, path: Path, *, lora: bool = False) -> Any:
    """``build_model(dequantize=False)`` (and LoRA, on meta) -> one layer's ``down_proj`` alone as an FSDP2
    unit (FP8 codes only: on gloo that works because they are stored as uint8; with a BF16 mixed-precision
    policy, which leaves integer parameters alone), every layer, the root -> ``to_empty``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = automodel_plugins.build_model(path, dequantize=False)
    if lora:
        model = with_lora(model)
    base = model.get_base_model() if lora else model
    layers = base.model.language_model.layers
    down_proj = layers[0].mlp.down_proj
    bf16_params = MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False)
    fully_shard(down_proj.base_layer if lora else down_proj, mesh=ctx.mesh, mp_policy=bf16_params)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    return model


def with_lora(model: Any) -> Any:
    """The same random (non-zero B) LoRA on every FP8 projection and the projector, for the same model."""
    import peft

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_1"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def codes_held(model: Any) -> tuple[int, int]:
    """FP8 code bytes this rank holds (local shards) and the model's total."""
    from automodel_plugins.model.fp8_linear import Fp8Linear

    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    local = sum(_checks.local_value(m.weight).numel() for m in layers)
    return local, sum(m.weight.numel() for m in layers)


def fsdp_resident_load(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """The sharded load of FP8-resident layers: each rank reads and holds only its slice of the FP8 codes
    (plus every scale whole); gathered, the codes and scales are the single-process load's bit for bit."""
    path = ctx.checkpoint(checkpoint)
    reference = automodel_plugins.from_pretrained(path, dequantize=False)
    model = fsdp_resident_model(ctx, path)
    result = load_recorded(model, path)
    result["fp8_resident"] = model.automodel_composition.fp8_resident
    result["codes_held"], result["codes_total"] = codes_held(model)
    result["codes_dtype"] = str(model.model.language_model.layers[1].mlp.up_proj.weight.dtype)
    gathered = {name: _checks.full_value(t) for name, t in model_tensors(model).items()}
    result["full_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    model.eval()
    batch = _tiny.inputs()
    result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))
    return result


def fsdp_resident_lora(ctx: Context) -> dict[str, Any]:
    """A LoRA training step on the FP8-resident model, FSDP2 on 2 ranks (each its half of the batch) against
    the same step in one process on the mean of the halves' losses (:func:`_mean_lora_step`: FSDP2's averaged
    gradients, summed over the same rows in the same order): loss, every LoRA gradient, the updated adapters.

    The whole batch in one process (``whole_*``) is checked too, where it can agree: the loss before the step
    and the gradients, which differ from the halves' only by fp32 summation order (~2e-8). The loss after the
    step is not compared with it: in this BF16 model a few-ulp change of the fp32 adapters flips BF16 roundings
    in the forward and moves the loss by up to ~2e-4, so which batch split the step used decides that loss."""
    path = ctx.checkpoint("block_untied")
    batch = _tiny.inputs(batch=2 * ctx.world)
    rows = batch["input_ids"].shape[0] // ctx.world
    halves = [{k: v[r * rows : (r + 1) * rows] for k, v in batch.items()} for r in range(ctx.world)]
    whole = with_lora(automodel_plugins.from_pretrained(path, dequantize=False)).train()
    whole_grads, _, whole_losses = _lora_step(whole, batch)
    del whole
    single = with_lora(automodel_plugins.from_pretrained(path, dequantize=False)).train()
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    single_grads, single_after, single_losses = _mean_lora_step(single, halves)

    model = fsdp_resident_model(ctx, path, lora=True)
    automodel_plugins.load_weights(model, path)
    lora_sharded = all(_checks.is_dtensor(p) for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # the adapters' initial values, each rank its shard (to_empty left garbage)
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    model.train()
    grads, after, losses = _lora_step(model, halves[ctx.rank])
    mean_losses = []
    for loss in losses:
        value = torch.tensor(loss)
        dist.all_reduce(value)
        mean_losses.append(value.item() / ctx.world)
    codes_local, codes_total = codes_held(model)
    return {
        "losses": mean_losses,
        "single_losses": single_losses,
        "whole_losses": whole_losses,
        "grad_names": sorted(grads),
        "single_grad_names": sorted(single_grads),
        "max_grad_diff": max((grads[n] - single_grads[n]).abs().max().item() for n in single_grads),
        "max_whole_grad_diff": max((grads[n] - whole_grads[n]).abs().max().item() for n in whole_grads),
        "max_param_diff": max((after[n] - single_after[n]).abs().max().item() for n in single_after),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "codes_held": codes_local,
        "codes_total": codes_total,
        "lora_sharded": lora_sharded,  # at rest (the root unit stays unsharded after a forward)
    }


def _lora_step(model: Any, batch: dict[str, torch.Tensor]) -> tuple[dict, dict, list[float]]:
    """Forward, backward, one SGD step, and the loss after it: (full LoRA grads, full LoRA params, losses)."""
    return _mean_lora_step(model, [batch])


def _mean_lora_step(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[dict, dict, list[float]]:
    """:func:`_lora_step` on the mean of the ``batches``' losses (what FSDP2's averaged gradients are when
    every rank's batch has as many labels)."""
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


# --- tensor parallelism of FP8-resident layers ----------------------------------------------------------


def tp_resident_model(ctx: Context, path: Path, *, dequantize: bool = False, lora: bool = False) -> Any:
    """``build_model`` (and LoRA on q/v, on meta) -> ``parallelize_fp8`` (the model's tp_plan: q/k/v/gate/up
    column-wise, o/down row-wise) -> ``to_empty`` -> ``load_weights``, each rank its rows or columns."""
    model = automodel_plugins.build_model(path, dequantize=dequantize)
    if lora:
        model = with_qv_lora(model)
    automodel_plugins.parallelize_fp8(model, ctx.mesh)
    model.to_empty(device="cpu")
    return model


def with_qv_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tp_resident_load(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """The tensor-parallel load of FP8-resident layers: each rank reads and holds its rows (column-wise) or
    columns (row-wise) of the codes, every scale whole; gathered, the single-process load bit for bit; logits
    equal to the same tensor-parallel layout of the dequantized model (bit for bit) and to one process."""
    path = ctx.checkpoint(checkpoint)
    reference = automodel_plugins.from_pretrained(path, dequantize=False)
    model = tp_resident_model(ctx, path)
    result = load_recorded(model, path)
    result["fp8_resident"] = len(model.automodel_composition.fp8_resident)
    result["codes_held"], result["codes_total"] = codes_held(model)
    result["placements"] = {
        name: [repr(p) for p in module.weight.placements]
        for name, module in model.named_modules()
        if name.endswith(("layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.q_proj"))
    }
    gathered = {name: _checks.full_value(t) for name, t in model_tensors(model).items()}
    result["full_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    dequantized = tp_resident_model(ctx, path, dequantize=True)
    automodel_plugins.load_weights(dequantized, path)
    batch = _tiny.inputs()
    mine, theirs, single = (logits(m.eval(), batch) for m in (model, dequantized, reference))
    result["logits_equal_tp_dequantized"] = bool(torch.equal(mine, theirs))
    result["logits_max_diff_single"] = _max_diff(mine, single)
    result["logits_max_abs"] = single.float().abs().max().item()
    result["logits_dtype"] = str(mine.dtype)
    return result


def tp_resident_lora(ctx: Context) -> dict[str, Any]:
    """A LoRA step (q_proj/v_proj) over the tensor-parallel FP8-resident model, both ranks on the same batch,
    against the same step in one process: losses, every LoRA gradient and updated adapter (gathered)."""
    path = ctx.checkpoint("block_untied")
    batch = _tiny.inputs(batch=2)
    single = with_qv_lora(automodel_plugins.from_pretrained(path, dequantize=False)).train()
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    single_grads, single_after, single_losses = _lora_step(single, batch)

    def split_step(dequantize: bool) -> tuple[Any, dict, dict, list[float]]:
        model = tp_resident_model(ctx, path, dequantize=dequantize, lora=True)
        automodel_plugins.load_weights(model, path)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
        return (model.train(), *_lora_step(model.train(), batch))

    model, grads, after, losses = split_step(dequantize=False)
    _, dequantized_grads, dequantized_after, dequantized_losses = split_step(dequantize=True)
    return {
        "equal_to_split_dequantized": losses == dequantized_losses
        and all(torch.equal(grads[n], dequantized_grads[n]) for n in dequantized_grads)
        and all(torch.equal(after[n], dequantized_after[n]) for n in dequantized_after)
        and sorted(grads) == sorted(dequantized_grads),
        "losses": losses,
        "single_losses": single_losses,
        "grad_names": sorted(grads),
        "single_grad_names": sorted(single_grads),
        "max_grad_diff": max(_max_diff(grads[n], single_grads[n]) for n in single_grads),
        "max_grad": max(single_grads[n].abs().max().item() for n in single_grads),
        "max_param_diff": max(_max_diff(after[n], single_after[n]) for n in single_after),
        "lora_b_sharded": sorted(
            n for n, p in model.named_parameters() if "lora_B" in n and _checks.is_dtensor(p)
        ),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "codes_held": codes_held(model)[0],
        "codes_total": codes_held(model)[1],
    }


def held_by_kind(model: Any) -> dict[str, int]:
    """Bytes of this rank's local parameter shards and persistent buffers, by kind as ``plan_memory`` says them:
    FP8-resident codes, their scales, every other tensor by dtype (LoRA adapters apart, under ``lora``)."""
    from automodel_plugins.model.fp8_linear import Fp8Linear

    codes = {id(m.weight) for m in model.modules() if isinstance(m, Fp8Linear)}
    held: dict[str, int] = {}
    for name, tensor in model_tensors(model).items():
        local = _checks.local_value(tensor)
        kind = (
            "lora"
            if "lora_" in name
            else "fp8_codes"
            if id(tensor) in codes
            else "scales"
            if name.endswith(("_scale_inv", "activation_scale"))
            else str(local.dtype).removeprefix("torch.")
        )
        held[kind] = held.get(kind, 0) + local.numel() * local.element_size()
    return held


def plan_vs_measured(ctx: Context, layout: str) -> dict[str, Any]:
    """``plan_memory`` of the 16x16-block checkpoint (FP8-resident, LoRA r=4) for ``layout``, against
    this rank's load with that layout: bytes read (the reader's counter) and bytes held by kind."""
    from automodel_plugins.pipeline.load.memory_plan import plan_memory

    path = ctx.checkpoint("block_untied")
    if layout == "tp":
        model, targets = tp_resident_model(ctx, path, lora=True), ("q_proj", "v_proj")
    else:  # with_lora's targets
        model = fsdp_resident_model(ctx, path, lora=True)
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_1")
    report = automodel_plugins.load_weights(model, path)
    degrees = {"tp": ctx.world} if layout == "tp" else {"fsdp": ctx.world}
    plan = plan_memory(path, dequantize=False, lora_r=4, lora_targets=targets, **degrees)
    mine = plan.ranks[ctx.rank]
    return {
        "measured_read": report.bytes_read,
        "measured_held": held_by_kind(model),
        "planned_read": mine.read,
        "planned_held": dict(mine.held),
        "planned_lora_params": mine.lora["params"],
        "plan": plan.to_dict(),
    }


MERGE_FORMATS = ("source", "none")


def merge_dir(ctx: Context, checkpoint: str) -> Path:
    return ctx.out / f"merge-{checkpoint}"


def fsdp_resident_merge(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """An FSDP2 LoRA run on the FP8-resident base (one step, each rank half the batch), then ``merge_lora`` on
    every rank (each merges its own rows) and ``save_pretrained`` from every rank in each of
    :data:`MERGE_FORMATS`. Rank 0 writes the trained adapters (gathered) to ``adapters.safetensors``, from which
    the pytest side makes the one-process merge and save; here the gathered merged weights are compared with a
    one-process merge of the same adapters."""
    from safetensors.torch import save_file
    from torch import nn

    from automodel_plugins.model.fp8_linear import Fp8Linear

    path, out = ctx.checkpoint(checkpoint), merge_dir(ctx, checkpoint)
    single = with_lora(automodel_plugins.from_pretrained(path, dequantize=False))
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    model = fsdp_resident_model(ctx, path, lora=True)
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    model.train()
    batch = _tiny.inputs(batch=2 * ctx.world)
    rows = batch["input_ids"].shape[0] // ctx.world
    _, trained, _ = _lora_step(
        model, {k: v[ctx.rank * rows : (ctx.rank + 1) * rows] for k, v in batch.items()}
    )
    if ctx.rank == 0:
        out.mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in trained.items()}, out / "adapters.safetensors")
    dist.barrier()

    merged = automodel_plugins.merge_lora(model)  # the root unit is unsharded after the step's forward
    linears = {n: m for n, m in merged.named_modules() if type(m) is nn.Linear and "language_model" in n}
    result: dict[str, Any] = {
        "merged_type": type(merged).__name__,
        "fp8_left": sum(isinstance(m, Fp8Linear) for m in merged.modules()),
        "lora_left": sum("lora_" in n for n, _ in merged.named_parameters()),
        "merged_sharded": sorted(n for n, m in linears.items() if _checks.is_dtensor(m.weight)),
        "merged_rows": {n: _checks.chunk_bounds(m.weight) for n, m in linears.items()},
        "quantization_config": getattr(merged.config, "quantization_config", None) is not None,
    }
    with torch.no_grad():
        for name, param in single.named_parameters():
            if "lora_" in name:
                param.copy_(trained[name])
    reference = automodel_plugins.merge_lora(single)
    gathered = {name: _checks.full_value(t) for name, t in model_tensors(merged).items()}
    result["merge_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    result["reports"] = {}
    for quantization in MERGE_FORMATS:
        report = automodel_plugins.save_pretrained(merged, out / quantization, quantization=quantization)
        result["reports"][quantization] = {
            "bytes_written_by_rank": report.bytes_written_by_rank,
            "files": report.files,
            "scales_kept": report.scales_kept,
            "scales_fresh": report.scales_fresh,
        }
    return result


# --- FP8-resident experts (dequantize=False on a MoE) ---------------------------------------------------------


def moe_resident_model(ctx: Context, path: Path, *, lora: bool = False) -> Any:
    """``build_model(dequantize=False)`` (experts become ``Fp8Experts`` on meta; LoRA on the attention, on meta)
    -> every decoder layer and the root FSDP2 units (``Shard(0)``: experts 0-2 and 3-4) -> ``to_empty``."""
    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(path, dequantize=False)
    if lora:
        model = with_attention_lora(model)
    base = model.get_base_model() if lora else model
    for layer in base.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    return model


def with_attention_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )


def moe_fsdp_resident(ctx: Context) -> dict[str, Any]:
    """FP8-resident experts under FSDP2: each rank reads the FP8 bytes of its experts' pieces only (and every
    piece's scale: the stacked grid is a replicated buffer); gathered, codes and grids are the single-process
    load's; the logits with an image equal; a LoRA step on 2 ranks (one 12-token sequence with an image each)
    equals one process on both."""
    from automodel_plugins.model.fp8_experts import Fp8Experts

    path = ctx.checkpoint(_tiny.MOE_ALIGNED)
    reference = automodel_plugins.from_pretrained(path, dequantize=False)
    model = moe_resident_model(ctx, path)
    result = load_recorded(model, path, rename=lambda name: name)
    composition = model.automodel_composition
    result["fp8_resident"], result["fp8_not_resident"] = (
        composition.fp8_resident,
        composition.fp8_not_resident,
    )
    result["resident_experts"] = sum(isinstance(m, Fp8Experts) for m in model.modules())
    result["pieces"] = composition.load.pieces
    tensors = model_tensors(model)
    experts = "model.language_model.layers.0.mlp.experts."
    result["expert_regions"] = {
        n: _checks.chunk_bounds(t) for n, t in tensors.items() if n.startswith(experts)
    }
    result["codes_dtype"] = str(tensors[experts + "gate_up_proj"].dtype)
    gathered = {name: _checks.full_value(t) for name, t in tensors.items()}
    result["full_mismatches"] = _checks.mismatches(gathered, model_tensors(reference))
    model.eval()
    batch = _tiny.moe_inputs(aligned=True)
    result["logits_equal"] = bool(torch.equal(logits(model, batch), logits(reference, batch)))

    batches = [_tiny.moe_inputs(aligned=True, batch=1, seed=1 + rank) for rank in range(ctx.world)]
    single = with_attention_lora(automodel_plugins.from_pretrained(path, dequantize=False)).train()
    initial = {n: p.detach().clone() for n, p in single.named_parameters() if "lora_" in n}
    single_grads, single_after, single_losses = _mean_lora_step(single, batches)
    model = moe_resident_model(ctx, path, lora=True)
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    model.train()
    grads, after, losses = _mean_lora_step(model, [batches[ctx.rank]])
    mean_losses = []
    for loss in losses:
        value = torch.tensor(loss)
        dist.all_reduce(value)
        mean_losses.append(value.item() / ctx.world)
    result.update(
        losses=mean_losses,
        single_losses=single_losses,
        grad_names=sorted(grads),
        single_grad_names=sorted(single_grads),
        max_grad_diff=max((grads[n] - single_grads[n]).abs().max().item() for n in single_grads),
        max_param_diff=max((after[n] - single_after[n]).abs().max().item() for n in single_after),
    )
    return result


# --- saving ---------------------------------------------------------------------------------------------------

SAVE_FORMATS = {"source": {}, "fp8-block": {"block_size": _tiny.BLOCK}, "none": {}}
GROWN = "model.language_model.layers.1.mlp.up_proj.weight"
"""A weight pushed far past its scale before saving (3x): its amax must be combined over the ranks. Under the
tensor-parallel layout it is a Shard(1) weight whose 67 columns split 34 + 33, inside a 16-wide block."""


def save_all(model: Any, out: Path) -> dict[str, Any]:
    """``save_pretrained`` of ``model`` in every format (every rank calls it), and what each report says."""
    reports = {}
    for quantization, options in SAVE_FORMATS.items():
        report = automodel_plugins.save_pretrained(
            model, out / quantization, quantization=quantization, **options
        )
        reports[quantization] = {
            "bytes_written": report.bytes_written,
            "bytes_written_by_rank": report.bytes_written_by_rank,
            "files": report.files,
            "quantized": report.quantized,
            "scales_kept": report.scales_kept,
            "scales_fresh": report.scales_fresh,
        }
    return {
        "reports": reports,
        "regions": {name: _checks.chunk_bounds(t) for name, t in model_tensors(model).items()},
    }


def gathered_state(ctx: Context, model: Any, file: Path) -> None:
    """Every rank gathers the model's state dict; rank 0 writes it to ``file``, the weights a single process
    then saves for comparison."""
    from safetensors.torch import save_file

    state = {name: _checks.full_value(t).detach().contiguous() for name, t in model.state_dict().items()}
    if ctx.rank == 0:
        save_file(state, file)


def fsdp_save(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """FSDP2: save right after the load (untouched), then after one SGD step and a weight grown past its scale."""
    path = ctx.checkpoint(checkpoint)
    out = ctx.out / f"fsdp-save-{checkpoint}"
    model = fsdp_model(ctx, path)
    automodel_plugins.load_weights(model, path)
    result = {"untouched": save_all(model, out / "untouched")}
    model.train()
    _train(model, _tiny.inputs(), steps=1)
    with torch.no_grad():
        model.get_parameter(GROWN).mul_(3.0)
    model.eval()
    result["trained"] = save_all(model, out / "trained")
    gathered_state(ctx, model, out / "trained-weights.safetensors")
    return result


def tp_save(ctx: Context, checkpoint: str) -> dict[str, Any]:
    """The tensor-parallel layout (Shard(0) / Shard(1) / Replicate), one weight grown past its scale."""
    path = ctx.checkpoint(checkpoint)
    out = ctx.out / f"tp-save-{checkpoint}"
    model = automodel_plugins.build_model(path)
    _stages.distribute_parameters(model, ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        model.get_parameter(GROWN).mul_(3.0)
    result = save_all(model, out)
    result["grown_placements"] = [repr(p) for p in model.get_parameter(GROWN).placements]
    gathered_state(ctx, model, out / "weights.safetensors")
    return result


def save_failures(ctx: Context) -> dict[str, Any]:
    """A full disk on rank 1 only, and a non-empty destination: every rank raises, nothing is left behind."""
    import errno

    import automodel_plugins.checkpoint.writer as writer_module

    path = ctx.checkpoint("block_untied")
    model = fsdp_model(ctx, path)
    automodel_plugins.load_weights(model, path)
    parent = ctx.out / "save-failures"
    if ctx.rank == 0:
        (parent / "full").mkdir(parents=True)
        (parent / "taken").mkdir()
        (parent / "taken" / "mine.txt").write_text("keep")
    dist.barrier()
    result: dict[str, Any] = {}
    real = writer_module.os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    if ctx.rank == 1:
        writer_module.os.pwrite = full_disk
    try:
        automodel_plugins.save_pretrained(model, parent / "full" / "out")
    except Exception as exc:
        result["full_disk"] = [type(exc).__name__, str(exc), getattr(exc, "errno", None)]
    finally:
        writer_module.os.pwrite = real
    try:
        automodel_plugins.save_pretrained(model, parent / "taken")
    except Exception as exc:
        result["taken"] = [type(exc).__name__, str(exc)]
    dist.barrier()
    result["left_in_full"] = sorted(p.name for p in (parent / "full").iterdir())
    result["left_in_parent"] = sorted(p.name for p in parent.iterdir())
    result["taken_contents"] = sorted(p.name for p in (parent / "taken").iterdir())
    return result


SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "fsdp_per_tensor": lambda ctx: fsdp_load(ctx, "per_tensor_tied"),
    "fsdp_block": lambda ctx: fsdp_load(ctx, "block_untied"),
    "fsdp_text_only": fsdp_text_only,
    "fsdp_native": fsdp_native,
    "moe_fsdp": moe_fsdp,
    "moe_expert_parallel": lambda ctx: moe_distributed(ctx, expert_dim=0),
    "moe_expert_rows": lambda ctx: moe_distributed(ctx, expert_dim=1),
    "tp_per_tensor": lambda ctx: tp_load(ctx, "per_tensor_tied"),
    "tp_block": lambda ctx: tp_load(ctx, "block_untied"),
    "pipeline": pipeline,
    "train": train_step,
    "hub_fsdp": hub_fsdp,
    "hub_pipeline": hub_pipeline,
    "hub_one_rank": hub_one_rank,
    "fsdp_resident_per_tensor": lambda ctx: fsdp_resident_load(ctx, "per_tensor_untied"),
    "fsdp_resident_block": lambda ctx: fsdp_resident_load(ctx, "block_untied"),
    "fsdp_resident_lora": fsdp_resident_lora,
    "moe_fsdp_resident": moe_fsdp_resident,
    "fsdp_resident_merge_per_tensor": lambda ctx: fsdp_resident_merge(ctx, "per_tensor_untied"),
    "fsdp_resident_merge_block": lambda ctx: fsdp_resident_merge(ctx, "block_untied"),
    "fsdp_save_per_tensor": lambda ctx: fsdp_save(ctx, "per_tensor_tied"),
    "fsdp_save_block": lambda ctx: fsdp_save(ctx, "block_untied"),
    "tp_save_block": lambda ctx: tp_save(ctx, "block_untied"),
    "tp_save_per_tensor": lambda ctx: tp_save(ctx, "per_tensor_untied"),
    "save_failures": save_failures,
    "tp_resident_per_tensor": lambda ctx: tp_resident_load(ctx, "per_tensor_untied"),
    "tp_resident_block_cut": lambda ctx: tp_resident_load(ctx, "block_untied"),
    "tp_resident_block_aligned": lambda ctx: tp_resident_load(ctx, "block4_untied"),
    "tp_resident_lora": tp_resident_lora,
    "plan_fsdp": lambda ctx: plan_vs_measured(ctx, "fsdp"),
    "plan_tp": lambda ctx: plan_vs_measured(ctx, "tp"),
    "accelerate_head": accelerate_head,
    "fsdp_head_layouts": fsdp_head_layouts,
    **_mistral4.SCENARIOS,
    **_native.SCENARIOS,
    **_experts_lora.SCENARIOS,
    **_expert_parallel.SCENARIOS,
    **_ep_lora.SCENARIOS,
    **_ep_lora_shard.SCENARIOS,
    **_peft_merge_config.SCENARIOS,
    **_rotary_compile.SCENARIOS,
    **_native_save.SCENARIOS,
    **_compressed_tensors_save.SCENARIOS,
    **_fsdp_save_config.SCENARIOS,
    **_ct_state_dict.SCENARIOS,
    **_source_save_dtype.SCENARIOS,
    **_experts_tp.SCENARIOS,
    **_tp_norm_grads.SCENARIOS,
}


# --- driver ------------------------------------------------------------------------------------------------


def write_result(ctx: Context, scenario: str, result: dict[str, Any]) -> None:
    folder = ctx.out / "results"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{scenario}.rank{ctx.rank}.json"
    target.with_suffix(".tmp").write_text(json.dumps(result, indent=1, default=str))
    target.with_suffix(".tmp").rename(target)


def teardown(ctx: Context) -> None:
    """Drop this rank's references to the mesh and destroy the process group (see the module docstring)."""
    ctx.mesh = None
    gc.collect()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    scenarios, out = argv[0].split(","), Path(argv[1])
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    torch.set_num_threads(1)
    # A launch the harness is about to kill shows where every thread of every rank was, in the log.
    harness_timeout = float(os.environ.get("AUTOMODEL_PLUGINS_DISTRIBUTED_TIMEOUT", "180"))
    faulthandler.dump_traceback_later(max(harness_timeout - 15, 5), exit=False)
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    from torch.distributed.device_mesh import init_device_mesh

    ctx = Context(
        dist.get_rank(), dist.get_world_size(), init_device_mesh("cpu", (dist.get_world_size(),)), out
    )
    try:
        if ctx.rank == 0:
            for name, (block, tied) in CHECKPOINTS.items():
                _tiny.write_checkpoint(ctx.checkpoint(name), block_size=block, tie_word_embeddings=tied)
            _tiny.write_text_only_checkpoint(ctx.checkpoint(_tiny.TEXT_ONLY))
            _tiny.write_native_checkpoint(ctx.checkpoint(_tiny.NATIVE))
            _tiny.write_moe_checkpoint(ctx.checkpoint(_tiny.MOE))
            _tiny.write_moe_checkpoint(ctx.checkpoint(_tiny.MOE_ALIGNED), aligned=True)
        dist.barrier()
        for scenario in scenarios:
            try:
                result = SCENARIOS[scenario](ctx)
            except Exception:
                write_result(ctx, scenario, {"error": traceback.format_exc()})
                raise
            write_result(ctx, scenario, result)
            dist.barrier()
    finally:
        teardown(ctx)
    return 0


def run(argv: list[str]) -> int:
    """``main``'s exit status; an exception is printed (as Python would) and gives 1."""
    try:
        return main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 2
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    os.environ.setdefault("AUTOMODEL_PLUGINS_PROGRESS", "0")
    status = run(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Results are written and the group destroyed: skip the interpreter finalization that would tear down what
    # still holds it (see the module docstring).
    os._exit(status)
