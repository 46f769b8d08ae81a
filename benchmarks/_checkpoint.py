"""The benchmarks' FP8 Mistral3 checkpoint: ~0.35B parameters, written once in the real on-disk format.

Text stack: hidden 2048, intermediate 6144, 4 layers, 16 heads / 4 KV heads, head_dim 128, vocab 32768, YaRN
rotary as Ministral 3 ships it; a small Pixtral tower (hidden 256, 2 layers); untied ``lm_head``. On disk: the
legacy (nested) key layout, every text-stack Linear ``float8_e4m3fn`` with a 0-d fp32 ``weight_scale_inv`` and a
static ``activation_scale`` (``kind="per-tensor"``, Ministral 3's format) or a 128x128 scale grid
(``kind="block"``), vision tower / projector / embeddings / norms / ``lm_head`` in BF16, 3 shards plus an index.

Generated on first use under ``<repo>/.cache/bench/`` (git-ignored) and reused afterwards; a spec change gives
a new directory name. Generation peaks near 2x the fp32 model (~2.8 GB here): the random model plus its
quantized copy. Safe to call from several processes at once (a file lock; the directory appears atomically).

    from benchmarks._checkpoint import ensure_checkpoint, bf16_parameter_bytes
    path = ensure_checkpoint()             # Path to the checkpoint directory
    bf16_parameter_bytes(path)             # bytes of the loaded BF16 model's parameters (tied counted once)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from automodel_plugins.testing.tiny_models import MINISTRAL3_ROPE_PARAMETERS

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "bench"
KINDS = {"per-tensor": None, "block": (128, 128)}
SHARDS = 3
SEED = 0

TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 32768,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
    "rope_parameters": dict(MINISTRAL3_ROPE_PARAMETERS),
}
VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 64,
    "image_size": 1540,
    "patch_size": 14,
}
TOP = {"image_token_id": 10, "spatial_merge_size": 2, "tie_word_embeddings": False}
MODULES_TO_NOT_CONVERT = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def build_config(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None, **top: Any):
    """The ``Mistral3Config`` of the benchmark model (or of a variant: override any field)."""
    from transformers import Mistral3Config, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    return Mistral3Config(
        text_config=Ministral3Config(**{**TEXT, **(text or {})}),
        vision_config=PixtralVisionConfig(**{**VISION, **(vision or {})}),
        **{**TOP, **top},
    )


def legacy_rename():
    """runtime name -> legacy (nested) checkpoint key, with the plugin's own rename rules."""
    from automodel_plugins_mistral3_fp8.layout import LEGACY_RENAMES

    from automodel_plugins.adapters import PrefixRenames

    return PrefixRenames(LEGACY_RENAMES).to_checkpoint


def write_checkpoint(
    directory: Path,
    *,
    kind: str = "per-tensor",
    shards: int = SHARDS,
    seed: int = SEED,
    config=None,
) -> Path:
    """Write a random Mistral3 model of ``config`` (default: the benchmark's) as an FP8 checkpoint."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    config = config or build_config()
    # fp32 init (the stock initializer), then quantized / cast to BF16 tensor by tensor by the writer.
    model = Mistral3ForConditionalGeneration(config).eval()
    model.config.architectures = ["Mistral3ForConditionalGeneration"]  # as save_pretrained writes it
    write_fp8_checkpoint(
        model,
        directory,
        block_size=KINDS[kind],
        rename=legacy_rename(),
        modules_to_not_convert=MODULES_TO_NOT_CONVERT,
        shards=shards,
    )
    return directory


def _spec_digest(kind: str) -> str:
    spec = {"text": TEXT, "vision": VISION, "top": TOP, "kind": kind, "shards": SHARDS, "seed": SEED, "v": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def checkpoint_dir(kind: str = "per-tensor") -> Path:
    return CACHE_DIR / f"mistral3-fp8-{kind}-{_spec_digest(kind)}"


def ensure_checkpoint(kind: str = "per-tensor", *, quiet: bool = False) -> Path:
    """The cached checkpoint directory for ``kind`` ("per-tensor" or "block"), generated on first call."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    final = checkpoint_dir(kind)
    if (final / "config.json").is_file():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():  # another process wrote it while we waited
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        if not quiet:
            print(
                f"[bench] generating the {kind} FP8 checkpoint into {final} (once) ...",
                file=sys.stderr,
                flush=True,
            )
        write_checkpoint(tmp, kind=kind)
        tmp.rename(final)
        if not quiet:
            size = sum(f.stat().st_size for f in final.iterdir()) / 2**20
            print(
                f"[bench] wrote {size:.0f} MiB in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return final


def bf16_parameter_bytes(path: str | Path) -> int:
    """Bytes of the model's parameters once loaded in BF16 (tied tensors counted once), from its config."""
    import torch

    from automodel_plugins.model.stock import build_on_meta
    from automodel_plugins.sources import load_config

    model = build_on_meta(load_config(path), torch.bfloat16)
    return sum(p.numel() for p in model.parameters()) * torch.bfloat16.itemsize


def parameter_count(path: str | Path) -> int:
    return bf16_parameter_bytes(path) // 2


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["per-tensor"]:
        path = ensure_checkpoint(kind)
        print(
            path,
            f"{parameter_count(path) / 1e9:.3f}B parameters, {bf16_parameter_bytes(path) / 2**20:.0f} MiB BF16",
        )
