"""compressed-tensors checkpoints saved from every rank of an FSDP2 run (2 CPU ranks, gloo), for ``_worker.py``.

The HF source of ``tests/test_compressed_tensors_save.py`` (Mistral 4, FP8_BLOCK 16x16 with ``weight_scale``,
per-expert experts, the ignored vision tower and MLA down-projections BF16), loaded into a model sharded on every
decoder layer and the root, saved as it came (``quantization="source"``) and re-quantized
(``quantization="fp8-block"``, 8x8): the test compares the first with the source and the second with what one
process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

import automodel_plugins
from automodel_plugins.model.tensors import model_tensors
from distributed import _checks
from distributed._native_save import _report


def checkpoint(ctx: Any) -> Path:
    from test_compressed_tensors_save import write_hf_source

    root = ctx.out / "ckpt-ct"
    if ctx.rank == 0 and not root.is_dir():
        write_hf_source(root)
    dist.barrier()
    return root / "hf-ct"


def fsdp_ct_save(ctx: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    path = checkpoint(ctx)
    out = ctx.out / "ct-fsdp-save"
    model = automodel_plugins.build_model(path)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    tensors = model_tensors(model)
    return {
        "plain_tensors": sorted(n for n, t in tensors.items() if not _checks.is_dtensor(t)),
        "source": _report(automodel_plugins.save_pretrained(model, out / "source")),
        "fp8-block": _report(
            automodel_plugins.save_pretrained(
                model, out / "fp8-block", quantization="fp8-block", block_size=8
            )
        ),
    }


SCENARIOS = {"ct_fsdp_save": fsdp_ct_save}
