"""The plugin author's kit: fixtures, tiny models, FP8 checkpoints in the real on-disk formats, and comparisons.

* ``pytest_plugin``: the fixtures (loaded through the ``pytest11`` entry point), listed in its docstring;
* ``checkpoints``: ``write_fp8_checkpoint``, a stock model written as an FP8 checkpoint;
* ``header_only``: ``write_header_only_checkpoint``, a full-size FP8 checkpoint of headers and no data (sparse;
  one file, or shards and their index);
* ``compare``: ``assert_matches_stock`` and an independent reference dequantization;
* ``tiny_models``: tiny stock configs and batches (Mistral3, Qwen3-VL, Llama);
* ``fake_hub``: a stand-in Hugging Face Hub on 127.0.0.1 (stdlib only), for repo ids without network;
* ``hub_cache``: a Hugging Face cache laid out by hand, for offline tests of repo ids;
* ``residency``: watching for float copies of FP8-resident weights (how many, how long, saved for backward);
* ``stock_conversions``: stock transformers' per-expert conversion registered for a model type lacking it.

Nothing here imports torch at import time.
"""
