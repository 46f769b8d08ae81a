"""Fine-tune an FP8 checkpoint with FSDP2 on N processes, then save it in FP8 from every rank.

    torchrun --nproc_per_node N examples/train_fsdp2.py --model PATH_OR_REPO --steps K --out DIR \\
        [--backend gloo|nccl] [--device cpu|cuda] [--fp8-resident --lora-r 16 | --full]

The flow (docs/distributed.md): ``build_model`` on the meta device (a local path or a hub repo id; the ranks of
one machine share one download) -> LoRA adapters on meta (``--fp8-resident``: the FP8 linears stay FP8,
1 byte a parameter) -> ``fully_shard`` every decoder layer and the root -> ``to_empty`` -> ``load_weights``
(each rank reads and dequantizes only its own slices) -> K AdamW steps on synthetic data (each rank its own
rows; the fused loss never builds ``[tokens, vocab]`` logits) -> for LoRA: the adapter saved (gathered, rank 0
writes) and merged with ``automodel_plugins.merge_lora`` -> ``automodel_plugins.save_pretrained`` from every rank
(each writes its own shards, FP8 as the checkpoint came). Rank 0 writes ``DIR/losses.json``.

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

import automodel_plugins
from automodel_plugins.model.forward import text_vocab_size

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub repo id")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="writes losses.json, adapter/ and finetuned-fp8/ (new) into it",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="full fine-tune of the dequantized model (default)")
    mode.add_argument("--fp8-resident", action="store_true", help="LoRA on FP8-resident linears")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument(
        "--no-merge", action="store_true", help="LoRA: save the adapter only, no merge or FP8 save"
    )
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-3 full, 1e-2 LoRA)")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=32, help="tokens per row")
    args = parser.parse_args(argv)
    if args.fp8_resident and args.lora_r <= 0:
        parser.error("--fp8-resident trains LoRA adapters only: pass --lora-r R (R > 0)")
    if args.full and args.lora_r > 0:
        parser.error("--full and --lora-r are exclusive")
    return args


def synthetic_batch(config: Any, *, rank: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random token ids (rank-seeded: each rank its own rows), labels equal to the ids. The same batch every
    step, so that the loss falls as the model memorizes it."""
    generator = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, text_vocab_size(config), (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a VLM (``model.language_model.layers``) or a text-only model (``model.layers``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def build_sharded(args: argparse.Namespace, mesh: Any, device: torch.device) -> Any:
    """meta -> (LoRA) -> fully_shard -> to_empty -> load_weights: no rank ever holds the whole model."""
    from torch.distributed.fsdp import fully_shard

    model = automodel_plugins.build_model(args.model, dequantize=not args.fp8_resident, skip_logits=True)
    if args.lora_r > 0:
        import peft

        config = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS)
        model = peft.get_peft_model(model, config)  # adapters on meta too: FSDP2 shards them
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)  # each rank allocates its own shards, uninitialized
    automodel_plugins.load_weights(model, args.model)  # each rank reads its own slices
    if args.lora_r > 0:
        init_adapters(model)  # to_empty left them uninitialized
    return model


def init_adapters(model: Any) -> None:
    """PEFT's own initialization of every LoRA adapter (A random, B zero: training starts at the base model)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, init_lora_weights=True)


def train(model: Any, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> list[float]:
    """``args.steps`` AdamW steps; the mean loss over the ranks at each."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else (1e-2 if args.lora_r > 0 else 1e-3)
    optimizer = torch.optim.AdamW(params, lr=lr)  # after fully_shard, before the first forward
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch).loss  # the fused loss: logits never built (skip_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f}", flush=True)
    model.reshard()  # FSDP2 leaves the root unsharded after its forward: save the shards
    return losses


def save_adapter(model: Any, directory: Path) -> None:
    """The LoRA adapter in PEFT's format: every rank gathers its adapters' shards, rank 0 writes them."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    full = {
        name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()
        for name, tensor in model.state_dict().items()
        if "lora_" in name
    }
    adapter = get_peft_model_state_dict(model, state_dict=full)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, directory / "adapter_model.safetensors")
        model.peft_config["default"].save_pretrained(directory)
    dist.barrier()


def run(args: argparse.Namespace) -> None:
    """Everything between ``init_process_group`` and its teardown; the model and mesh die with this frame."""
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(args.device, (dist.get_world_size(),))
    model = build_sharded(args, mesh, device)
    batch = synthetic_batch(model.config, rank=dist.get_rank(), batch=args.batch, seq=args.seq)
    losses = train(model, {k: v.to(device) for k, v in batch.items()}, args)
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(
            json.dumps({"losses": losses, "world_size": dist.get_world_size()})
        )
    if args.lora_r > 0:
        save_adapter(model, args.out / "adapter")
        if args.no_merge:
            return
        model = automodel_plugins.merge_lora(model)  # merged layers: plain nn.Linear, the others FP8
    automodel_plugins.save_pretrained(model, args.out / "finetuned-fp8")  # every rank: its own shards
    if dist.get_rank() == 0:
        print(f"saved {args.out / 'finetuned-fp8'}", flush=True)


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
        # gloo's process group stops its threads only in its destructor, which something always keeps alive
        # until interpreter finalization; a thread freeing a finished collective's tensors there can abort the
        # process (SIGABRT, "terminate called without an active exception") after all work is done. Leave
        # without that finalization once everything is written (tests/distributed/_worker.py has the details).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
