"""Checkpoints on disk: safetensors headers, the shard index, the lazy reader, and the streaming writer.

* ``header``: one file's header, parsed and validated without touching tensor data;
* ``index``: ``model.safetensors.index.json``, which shard holds each tensor, refusing paths that escape;
* ``shard``: one file opened once; its header, memory map and reads all go through that open file, so a shard
  replaced by rename during a load is never mixed with its replacement;
* ``reader``: :class:`Checkpoint`, the keys, dtypes and shapes of every shard, and reads of whole tensors
  (memory-mapped) or of one rank's region;
* ``regions``: the byte runs of a box of a tensor (what the reader preads and the writer pwrites);
* ``writer``: safetensors files written at known offsets, byte-identical to ``save_file``;
* ``shards``: which file each tensor goes to, and the index, as ``save_pretrained`` writes them;
* ``write_behind``: the writes of a shard on one background thread, overlapping the next chunk's encoding;
* ``destination``: a checkpoint directory written in a temporary directory and renamed into place.
"""

from __future__ import annotations

from automodel_plugins.checkpoint.header import SAFETENSORS_DTYPES, TensorInfo
from automodel_plugins.checkpoint.reader import Checkpoint

__all__ = ["SAFETENSORS_DTYPES", "Checkpoint", "TensorInfo"]
