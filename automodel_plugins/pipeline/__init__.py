"""The load path and the save path, stage by stage::

    resolve ─> config ─> claim ─> headers vs config ─> stock class on meta ─> adapter ─> plan ─> stream tensors
            ─> post_materialize ─> tie ─> forward override ─> the stock model, with its composition record

    source record ─> save plan (headers only) ─> destination ─> write (each rank its boxes) ─> config, rename

* ``preflight``: what the config and the headers must agree on before anything is built (layer counts,
  embedding shape) or handed to stock transformers (FP8 tensors it would not scale);
* ``composition``: what was composed onto a model (and the checkpoint it came from), and the calls that ask the
  winning plugin's hooks;
* ``plan``: where each model tensor comes from and what becomes of it (headers only);
* ``stream``: reading each planned tensor (or one rank's region) into the model;
* ``resident``: which linear layers and MoE experts keep their FP8 weights (``dequantize=False``), and the swap
  to ``Fp8Linear`` / ``Fp8Experts``;
* ``load``: ``from_pretrained``, ``build_model``, ``load_weights``;
* ``describe``: what a load would do, without reading tensor data (``inspect``);
* ``save_plan``: the key, dtype, shape and FP8 scale each tensor is written with (headers only);
* ``save_values``: the values written, a chunk at a time, from a model or from a checkpoint;
* ``save_write``: who writes what, the scales (one all-reduce), the shard files;
* ``save``: ``save_pretrained``; ``convert``: ``automodel-plugins convert``;
* ``collective``: the few collectives a sharded save needs.
"""
