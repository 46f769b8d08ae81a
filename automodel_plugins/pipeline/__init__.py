"""The load path and the save path, stage by stage: ``load/`` reads a checkpoint into a stock model, ``save/``
writes a model (or converts a checkpoint) back; what both use sits beside them.

    resolve ─> config ─> claim ─> headers vs config ─> stock class on meta ─> adapter ─> plan ─> stream tensors
            ─> post_materialize ─> tie ─> forward override ─> the stock model, with its composition record

    source record ─> save plan (headers only) ─> destination ─> write (each rank its boxes) ─> config, rename

* ``load``: the load side (see its docstring): ``from_pretrained``, ``build_model``, ``load_weights``,
  ``describe_checkpoint``;
* ``save``: the save side (see its docstring): ``save_pretrained``, ``convert_checkpoint``;
* ``readers``: a checkpoint tensor read as the model's value (dequantized, cast, assembled from pieces, or kept
  FP8), for the load's streaming and for a save that converts a checkpoint alike;
* ``composition``: what was composed onto a model (and the checkpoint it came from), and the calls that ask the
  winning plugin's hooks.
"""
