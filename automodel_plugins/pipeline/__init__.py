"""The load path, stage by stage::

    resolve ─> config ─> claim ─> headers vs config ─> stock class on meta ─> adapter ─> plan ─> stream tensors
            ─> post_materialize ─> tie ─> forward override ─> the stock model, with its composition record

* ``preflight``: what the config and the headers must agree on before anything is built (layer counts,
  embedding shape) or handed to stock transformers (FP8 tensors it would not scale);
* ``composition``: what was composed onto a model, and the calls that ask the winning plugin's hooks;
* ``plan``: where each model tensor comes from and what becomes of it (headers only);
* ``stream``: reading each planned tensor (or one rank's region) into the model;
* ``load``: ``from_pretrained``, ``build_model``, ``load_weights``;
* ``describe``: what a load would do, without reading tensor data (``inspect``).
"""
