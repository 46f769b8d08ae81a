"""The plugin author's kit: fixtures, tiny models, FP8 checkpoints in the real on-disk formats, and comparisons.

* ``pytest_plugin``: the fixtures (loaded through the ``pytest11`` entry point), listed in its docstring;
* ``checkpoints``: ``write_fp8_checkpoint``, a stock model written as an FP8 checkpoint;
* ``compare``: ``assert_matches_stock`` and an independent reference dequantization;
* ``tiny_models``: tiny stock configs and batches (Mistral3, Qwen3-VL, Llama).

Nothing here imports torch at import time.
"""
