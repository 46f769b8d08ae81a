"""Checkpoints and repos the hub tests share: a tiny FP8 Llama in three shards, and the files a Mistral repo
carries beside the shards (``consolidated.safetensors`` as large as the shards together, ``params.json``) plus
files no load may fetch (``*.bin``, ``*.pth``, ``*.gguf``, code).

``fake_plugins.llama_claimer`` (no adapter: the host's default FP8 adapter reads ``quantization_config``) claims
it, so the tests do not depend on which plugins are installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from fake_plugins import llama_claimer
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from automodel_plugins.registry import Registry
from automodel_plugins.sources import CONFIG_NAME, INDEX_NAME
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.tiny_models import tiny_llama_config

NEVER_FETCHED = ("consolidated.safetensors", "params.json", "pytorch_model.bin", "model.pth", "model.gguf")
"""Files of the served repos that no load or inspect may download (``params.json``: Mistral's own config)."""


def registry() -> Registry:
    """Only the Llama claimer (``fake_plugins.llama_claimer``, as ``claim_llama``)."""
    registry = Registry()
    assert registry.register(llama_claimer, name="claim_llama").status == "loaded"
    return registry


def write_llama(directory: Path, *, seed: int = 0, block_size: tuple[int, int] | None = (32, 32)) -> Path:
    """A random tiny Llama as FP8 (block 32x32, partial edge blocks; ``None``: per tensor), three shards."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=200))
    return write_fp8_checkpoint(
        model, directory, block_size=block_size, modules_to_not_convert=("lm_head",), shards=3
    )


def mistral_extras(directory: Path) -> dict[str, bytes]:
    """What a Mistral repo ships beside the HF shards (``consolidated.safetensors``: every tensor again, in
    one file) and what no load reads (pickles, GGUF, a custom modeling file)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    consolidated = directory.parent / f"{directory.name}-consolidated.safetensors"
    save_file(tensors, consolidated)
    return {
        "consolidated.safetensors": consolidated.read_bytes(),
        "params.json": json.dumps({"dim": 32, "n_layers": 2}).encode(),
        "pytorch_model.bin": b"\x80\x04 not a pickle anyone should load",
        "model.pth": b"\x80\x04 nor this",
        "model.gguf": b"GGUF",
        "modeling_llama.py": b"raise SystemExit('remote code ran')\n",
    }


def weights_bytes(directory: Path) -> dict[str, int]:
    """Sizes of the files a load needs: the config, the index and the shards it names."""
    names = [CONFIG_NAME, INDEX_NAME, *sorted(set(index_of(directory).values()))]
    return {name: (directory / name).stat().st_size for name in names}


def index_of(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX_NAME).read_text())["weight_map"]


def reshard(directory: Path, target: Path, shard_of: Callable[[str], int], shards: int) -> Path:
    """``directory``'s tensors rewritten into ``shards`` files chosen by ``shard_of(key)``, with an index."""
    target.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[shard_of(key)] for key in tensors}
    for name in names:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == name}, target / name)
    (target / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (target / CONFIG_NAME).write_bytes((directory / CONFIG_NAME).read_bytes())
    return target
