"""The load side: a checkpoint into a stock model, one tensor (or one rank's region of it) at a time.

* ``preflight``: what the config and the headers must agree on before anything is built (layer counts,
  embedding shape) or handed to stock transformers (FP8 tensors it would not scale);
* ``plan``: where each model tensor comes from and what becomes of it (headers only);
* ``resident``: which linear layers and MoE experts keep their FP8 weights (``dequantize=False``), and the swap
  to ``Fp8Linear`` / ``Fp8Experts``;
* ``stream``: reading each planned tensor (or one rank's region) into the model;
* ``report``: ``LoadReport``, what a load did;
* ``load``: ``from_pretrained``, ``build_model``, ``load_weights``;
* ``options``: transformers' ``from_pretrained`` keywords on the plugin path, in one table (``OPTIONS``: supported,
  accepted, stock-only, refused), and the load's dtype (``dtype="auto"`` as transformers decides it);
* ``auto``: ``AutoModelForImageTextToText``, ``AutoModelForCausalLM``, ``AutoModel``: transformers' Auto classes
  routed through the registry;
* ``describe``: what a load would do, without reading tensor data (``inspect``);
* ``memory_plan``: the bytes each rank reads and holds for a parallel layout (``inspect --layout``).
"""
