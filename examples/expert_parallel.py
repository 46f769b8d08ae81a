"""Fine-tune a MoE FP8 checkpoint with expert parallelism and FSDP2 on N processes.

    torchrun --nproc_per_node N examples/expert_parallel.py --model PATH_OR_REPO --ep E --steps K --out DIR \\
        [--backend gloo|nccl] [--device cpu|cuda] [--fp8-resident --lora-r 16 | --full]

The flow (docs/distributed.md#expert-parallelism), on an ``(ep=E, dp=N/E)`` mesh: ``build_model`` on the meta
device (``--fp8-resident``: the experts become ``Fp8Experts``, 1 byte a parameter, and LoRA goes on the attention)
-> ``parallelize_experts`` on the ep dim (the model's own ``ep_plan``: each rank E-th of the experts, tokens sent
to their experts' ranks by all-to-all) -> ``fully_shard_experts`` on the dp dim -> ``fully_shard`` of every decoder
layer and the root on the whole mesh (HSDP: sharded over dp, replicated over ep) -> ``to_empty`` ->
``load_weights`` (each rank reads only its experts' pieces, codes and scale grids, and its shard of the rest) ->
K SGD steps on synthetic data (each rank its own rows). Rank 0 writes ``DIR/losses.json``; every rank
``DIR/rank<R>.json`` (bytes read, the experts it holds).

CPU and gloo run anywhere (``--backend gloo --device cpu``, the defaults); ``--backend nccl --device cuda`` on GPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from train_fsdp2 import decoder_layers, init_adapters, synthetic_batch

import automodel_plugins

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub repo id")
    parser.add_argument("--out", required=True, type=Path, help="writes losses.json and rank<R>.json into it")
    parser.add_argument(
        "--ep", type=int, required=True, help="expert-parallel degree (divides N and the experts)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="full fine-tune of the dequantized model (default)")
    mode.add_argument(
        "--fp8-resident", action="store_true", help="FP8 experts and linears, LoRA on attention"
    )
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (--fp8-resident)")
    parser.add_argument("--lr", type=float, default=1e-2, help="SGD learning rate")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default=None, help="default: the checkpoint's"
    )
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=32, help="tokens per row")
    args = parser.parse_args(argv)
    if args.fp8_resident and args.lora_r <= 0:
        parser.error("--fp8-resident trains LoRA adapters on the attention: pass --lora-r R (R > 0)")
    return args


def build(args: argparse.Namespace, mesh: Any, device: torch.device) -> tuple[Any, dict[str, str], int]:
    """meta -> (LoRA) -> experts split over ep, FSDP2 over dp -> layers HSDP -> to_empty -> load_weights."""
    from torch.distributed.fsdp import fully_shard

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = automodel_plugins.build_model(
        args.model, dequantize=not args.fp8_resident, skip_logits=True, dtype=dtype
    )
    if args.lora_r > 0:
        import peft

        config = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS)
        model = peft.get_peft_model(model, config)  # adapters on meta too
    held = automodel_plugins.parallelize_experts(model, mesh["ep"])
    automodel_plugins.fully_shard_experts(model, mesh["dp"])
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)  # each rank allocates its own experts and shards, uninitialized
    report = automodel_plugins.load_weights(model, args.model)  # each rank reads its own pieces
    if args.lora_r > 0:
        init_adapters(model)  # to_empty left them uninitialized
    return model, held, report.bytes_read


def train(model: Any, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> list[float]:
    """``args.steps`` SGD steps; the mean loss over the ranks at each."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr)  # after fully_shard, before the first forward
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f}", flush=True)
    return losses


def run(args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % args.ep:
        raise SystemExit(f"--ep {args.ep} does not divide the {world} processes")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(args.device, (args.ep, world // args.ep), mesh_dim_names=("ep", "dp"))
    model, held, bytes_read = build(args, mesh, device)
    rank = dist.get_rank()
    batch = synthetic_batch(model.config, rank=rank, batch=args.batch, seq=args.seq)
    losses = train(model, {k: v.to(device) for k, v in batch.items()}, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps({"bytes_read": bytes_read, "experts": held}))
    if rank == 0:
        (args.out / "losses.json").write_text(
            json.dumps({"losses": losses, "world_size": world, "ep": args.ep})
        )


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(args.backend)
    try:
        run(args)
    finally:
        gc.collect()  # DTensor caches holding the mesh, before the group goes
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    status = main(arguments)
    if arguments.backend == "gloo":
        # as examples/train_fsdp2.py: leave without interpreter finalization once everything is written (a gloo
        # thread freeing a finished collective's tensors there can abort the process after all work is done)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
