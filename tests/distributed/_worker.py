"""Distributed load scenarios, one torchrun launch for all of them (2 CPU ranks, gloo).

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
from distributed import _checks, _stages, _tiny

CHECKPOINTS = {  # name -> (block size, tied embeddings)
    "per_tensor_tied": (None, True),
    "per_tensor_untied": (None, False),
    "block_untied": (_tiny.BLOCK, False),
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
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    return model


def load_recorded(model: Any, path: Path, *, stage: bool = False) -> dict[str, Any]:
    """``load_weights`` with every checkpoint read recorded, against what this rank should read."""
    with _checks.record_reads() as reads:
        report = automodel_plugins.load_weights(model, path, stage=stage)
    with Checkpoint.open(path) as checkpoint:
        expected, expected_bytes = _checks.expected_reads(model, checkpoint, _tiny.legacy_rename)
        scale_bytes = sum(checkpoint.info(key).nbytes for key, _ in reads if key.endswith("_scale_inv"))
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
    result["own_unit_head"] = _own_unit_head(ctx, path, batch)
    return result


def _own_unit_head(ctx: Context, path: Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``lm_head`` as an FSDP2 unit of its own: its weight is unsharded only in ``lm_head``'s pre-hook, which
    the fused loss would skip, so a labelled call must warn and give the stock loss (with logits)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(path)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model.lm_head, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**batch, skip_logits=True)
    reference = _tiny.reference(path)
    del reference.forward  # the stock forward of the single-process load: the loss the fallback must give
    with torch.no_grad():
        reference_loss = reference(**batch).loss.item()
    return {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "loss": out.loss.item(),
        "reference_loss": reference_loss,
        "had_logits": out.logits is not None,
    }


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


SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "fsdp_per_tensor": lambda ctx: fsdp_load(ctx, "per_tensor_tied"),
    "fsdp_block": lambda ctx: fsdp_load(ctx, "block_untied"),
    "tp_per_tensor": lambda ctx: tp_load(ctx, "per_tensor_tied"),
    "tp_block": lambda ctx: tp_load(ctx, "block_untied"),
    "pipeline": pipeline,
    "train": train_step,
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
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    from torch.distributed.device_mesh import init_device_mesh

    ctx = Context(
        dist.get_rank(), dist.get_world_size(), init_device_mesh("cpu", (dist.get_world_size(),)), out
    )
    try:
        if ctx.rank == 0:
            for name, (block, tied) in CHECKPOINTS.items():
                _tiny.write_checkpoint(ctx.checkpoint(name), block_size=block, tie_word_embeddings=tied)
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
