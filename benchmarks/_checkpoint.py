"""The benchmarks' FP8 Mistral3 checkpoint: ~0.35B parameters, written once in the real on-disk format.

Text stack: hidden 2048, intermediate 6144, 4 layers, 16 heads / 4 KV heads, head_dim 128, vocab 32768, YaRN
rotary as Ministral 3 ships it; a small Pixtral tower (hidden 256, 2 layers); untied ``lm_head``. On disk: the
legacy (nested) key layout, every text-stack Linear ``float8_e4m3fn`` with a 0-d fp32 ``weight_scale_inv`` and a
static ``activation_scale`` (``kind="per-tensor"``, Ministral 3's format) or a 128x128 scale grid
(``kind="block"``), vision tower / projector / embeddings / norms / ``lm_head`` in BF16, 3 shards plus an index.

``ensure_moe_checkpoint()`` gives the MoE benchmark's checkpoint: a ~0.31B Qwen3-VL-MoE (hidden 1024, 4 layers
of 24 experts with expert intermediate 768, 8 heads / 2 KV heads of 128, vocab 32768, a small tower) in the FP8
releases' form: one 128x128-block FP8 tensor per expert and projection, attention FP8, routers / vision /
embeddings / norms / ``lm_head`` BF16, dynamic activations, 3 shards.

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


MOE_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 32768,
    "num_experts": 24,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 768,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]},
}
MOE_VISION = {
    "depth": 2,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_heads": 4,
    "out_hidden_size": 1024,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0],
}
MOE_BLOCK = (128, 128)
MOE_NOT_CONVERTED = (
    "model.visual",
    "lm_head",
    *(f"model.language_model.layers.{i}.mlp.gate" for i in range(MOE_TEXT["num_hidden_layers"])),
)


def build_moe_config():
    """The ``Qwen3VLMoeConfig`` of the MoE benchmark model."""
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig(
        text_config=dict(MOE_TEXT), vision_config=dict(MOE_VISION), tie_word_embeddings=False
    )
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    return config


def write_moe_checkpoint(directory: Path, *, shards: int = SHARDS, seed: int = SEED) -> Path:
    """Write a random benchmark Qwen3-VL-MoE as a per-expert block-FP8 checkpoint (the releases' form)."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(build_moe_config()).eval()
    write_fp8_checkpoint(
        model,
        directory,
        block_size=MOE_BLOCK,
        activation_scale_name=None,
        modules_to_not_convert=MOE_NOT_CONVERTED,
        shards=shards,
        experts="per-expert",
        quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"},
    )
    return directory


TINY_TEXT = {
    **TEXT,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 8192,
}
TINY_VISION = {**VISION, "intermediate_size": 1024, "image_size": 448}

# Qwen/Qwen3-VL-235B-A22B-Instruct-FP8 as released: its config.json's sizes, 94 layers of 128 experts.
QWEN3_VL_235B_TEXT = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 1536,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_235B_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "out_hidden_size": 4096,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "hidden_act": "gelu_pytorch_tanh",
}
QWEN3_VL_235B_SHARDS = 24
QWEN3_VL_235B_BLOCK = (128, 128)


def build_qwen3_vl_235b_config():
    """The ``Qwen3VLMoeConfig`` of Qwen3-VL-235B-A22B at full size (block FP8 as the FP8 release declares)."""
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig(
        text_config=dict(QWEN3_VL_235B_TEXT),
        vision_config=dict(QWEN3_VL_235B_VISION),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    return config


def write_header_only_235b(directory: Path) -> Path:
    """Qwen3-VL-235B-A22B in the FP8 release's form with headers only: every tensor the release stores (one
    128x128-block FP8 tensor + ``weight_scale_inv`` grid per expert and projection, attention FP8, routers /
    vision / embeddings / norms / ``lm_head`` BF16) with its real shape, dtype and offsets, in full-size files
    whose data is a hole (sparse: ~10 MB on disk for ~236 GB declared). Only headers can be read from it."""
    from automodel_plugins.testing.header_only import write_header_only_checkpoint

    layers = QWEN3_VL_235B_TEXT["num_hidden_layers"]
    write_header_only_checkpoint(
        build_qwen3_vl_235b_config(),
        directory,
        block_size=QWEN3_VL_235B_BLOCK,
        modules_to_not_convert=(
            "model.visual",
            "lm_head",
            *(f"model.language_model.layers.{i}.mlp.gate" for i in range(layers)),
        ),
        activation_scale=False,
        quantization_extra={"fmt": "e4m3"},
        shards=QWEN3_VL_235B_SHARDS,
    )
    return directory


def _spec_digest(kind: str) -> str:
    if kind == "moe":
        spec: dict[str, Any] = {"text": MOE_TEXT, "vision": MOE_VISION, "block": MOE_BLOCK, "shards": SHARDS}
    elif kind == "qwen3-vl-235b-header-only":
        spec = {
            "text": QWEN3_VL_235B_TEXT,
            "vision": QWEN3_VL_235B_VISION,
            "block": QWEN3_VL_235B_BLOCK,
            "shards": QWEN3_VL_235B_SHARDS,
        }
    elif kind == "tiny":
        spec = {"text": TINY_TEXT, "vision": TINY_VISION, "top": TOP, "shards": 2}
    else:
        spec = {"text": TEXT, "vision": VISION, "top": TOP, "kind": kind, "shards": SHARDS}
    spec.update(seed=SEED, v=2)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def checkpoint_dir(kind: str = "per-tensor") -> Path:
    family = {"moe": "qwen3-vl-moe-fp8-per-expert", "qwen3-vl-235b-header-only": kind}.get(
        kind, f"mistral3-fp8-{kind}"
    )
    return CACHE_DIR / f"{family}-{_spec_digest(kind)}"


def ensure_tiny_checkpoint(*, quiet: bool = False) -> Path:
    """A tiny Mistral3 FP8 checkpoint (the demo's sizes: hidden 512, 4 layers, vocab 8192; 2 shards, ~30 MiB),
    for the command-line benchmarks, where what counts is the fixed cost, not the bytes."""
    config = build_config(TINY_TEXT, TINY_VISION)
    return _ensure("tiny", lambda tmp: write_checkpoint(tmp, shards=2, config=config), quiet=quiet)


def ensure_header_only_235b(*, quiet: bool = False) -> Path:
    """The header-only Qwen3-VL-235B-A22B FP8 checkpoint (73,768 tensors in 24 shards), written on first call."""
    return _ensure("qwen3-vl-235b-header-only", write_header_only_235b, quiet=quiet)


def ensure_moe_checkpoint(*, quiet: bool = False) -> Path:
    """The cached MoE benchmark checkpoint directory, generated on first call."""
    return _ensure("moe", lambda tmp: write_moe_checkpoint(tmp), quiet=quiet)


def ensure_checkpoint(kind: str = "per-tensor", *, quiet: bool = False) -> Path:
    """The cached checkpoint directory for ``kind`` ("per-tensor" or "block"), generated on first call."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    return _ensure(kind, lambda tmp: write_checkpoint(tmp, kind=kind), quiet=quiet)


def _ensure(kind: str, write: Any, *, quiet: bool) -> Path:
    return ensure_directory(checkpoint_dir(kind), write, label=f"the {kind} FP8 checkpoint", quiet=quiet)


def ensure_directory(final: Path, write: Any, *, label: str, quiet: bool = False) -> Path:
    """``final``, written once by ``write(tmp)`` into a temporary sibling and renamed, under a lock (parallel
    benchmark processes wait for the first writer instead of writing it twice)."""
    if final.is_dir():  # written whole into a temporary sibling, then renamed: present means complete
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another process wrote it while we waited
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.perf_counter()
        if not quiet:
            print(
                f"[bench] generating {label} into {final} (once) ...",
                file=sys.stderr,
                flush=True,
            )
        write(tmp)
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
