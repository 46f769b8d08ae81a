"""The plugin's tests use the host's tiny Mistral3 checkpoints (``tests/mistral3_checkpoints.py``, on the test
path through ``pythonpath`` in the repository's pytest settings), the same ones its end-to-end tests load."""

from mistral3_checkpoints import checkpoints, no_tensor_reads, registry

__all__ = ["checkpoints", "no_tensor_reads", "registry"]
