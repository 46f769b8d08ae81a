"""Which shard file each tensor of a checkpoint being written goes to, and the index that says so.

Both are what transformers' ``save_pretrained`` writes for the same tensors in the same order: huggingface_hub's
greedy split (a new file when the next tensor would pass ``max_shard_size``; a tensor bigger than that gets a
file of its own), ``model.safetensors`` alone when everything fits in one file (no index), else
``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json`` with ``total_parameters`` and
``total_size``, dumped with ``indent=2, sort_keys=True`` and a final newline. Sizes are decimal (``5GB`` is
5 * 10**9 bytes), as there.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass

from automodel_plugins.checkpoint.writer import TensorSpec
from automodel_plugins.sources.resolve import (
    INDEX_NAME,
    NATIVE_INDEX_NAME,
    NATIVE_SAFETENSORS_NAME,
    SAFETENSORS_NAME,
)

__all__ = ["ShardPlan", "default_max_shard_size", "parse_shard_size", "plan_shards"]

_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def default_max_shard_size() -> str | int:
    """transformers' own ``save_pretrained`` default (``"50GB"`` in 5.x), read from its signature."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def parse_shard_size(value: int | str) -> int:
    """Bytes of ``value``: a positive int, or digits and a unit (``"5GB"``, ``"500MB"``, ``"1.5TB"``)."""
    if isinstance(value, bool):
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and value.strip()[-2:].upper() in _UNITS:
        text = value.strip()
        try:
            size = int(float(text[:-2].strip()) * _UNITS[text[-2:].upper()])
        except ValueError:
            raise ValueError(
                f"max_shard_size {value!r} is not a number followed by TB, GB, MB or KB"
            ) from None
    else:
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {value!r}")
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class ShardPlan:
    """The files of a checkpoint (name -> its tensors, in order) and the index mapping each tensor to its file."""

    files: dict[str, list[TensorSpec]]
    weight_map: dict[str, str]
    index_file: str = INDEX_NAME

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for specs in self.files.values() for spec in specs)

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    def index_text(self, total_parameters: int) -> str | None:
        """The index JSON transformers writes for these files; ``None`` for one file (no index)."""
        if not self.is_sharded:
            return None
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
            "weight_map": self.weight_map,
        }
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @property
    def index_name(self) -> str:
        return self.index_file


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str, *, native: bool = False) -> ShardPlan:
    """Split ``specs`` (in the order they are to be saved) into files, exactly as ``save_pretrained`` would;
    ``native``: named as Mistral's native checkpoints are (``consolidated.safetensors``, or
    ``consolidated-0000X-of-0000N.safetensors`` and ``consolidated.safetensors.index.json``)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    single = NATIVE_SAFETENSORS_NAME if native else SAFETENSORS_NAME
    by_name = {spec.name: spec for spec in specs}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda spec: spec.nbytes,
        filename_pattern=single.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=parse_shard_size(max_shard_size),
    )
    files = {name: [by_name[key] for key in keys] for name, keys in split.filename_to_tensors.items()}
    if not files:  # a model without tensors still gets its (empty) weights file
        files = {single: []}
    index = NATIVE_INDEX_NAME if native else INDEX_NAME
    return ShardPlan(files=files, weight_map=dict(split.tensor_to_filename), index_file=index)
