"""The host's end-to-end tests: every load, save, convert and inspect path through a real plugin, on tiny Mistral3
checkpoints in the on-disk formats (built once a session by ``mistral3_checkpoints``, which the Mistral3 plugin's
own tests share)."""

from mistral3_checkpoints import checkpoints, no_tensor_reads, registry

__all__ = ["checkpoints", "no_tensor_reads", "registry"]
