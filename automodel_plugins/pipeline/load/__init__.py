"""The load side: a checkpoint into a stock model, one tensor (or one rank's region of it) at a time.

* ``preflight``: what the config and the headers must agree on before anything is built (layer counts,
  embedding shape) or handed to stock transformers (FP8 tensors it would not scale);
* ``plan``: where each model tensor comes from and what becomes of it (headers only);
* ``resident``: which linear layers and MoE experts keep their FP8 weights (``dequantize=False``), and the swap
  to ``Fp8Linear`` / ``Fp8Experts``;
* ``stream``: reading each planned tensor (or one rank's region) into the model;
* ``report``: ``LoadReport``, what a load did;
* ``load``: ``from_pretrained``, ``build_model``, ``load_weights``;
* ``describe``: what a load would do, without reading tensor data (``inspect``).
"""
