"""The save side: a model (``save_pretrained``) or a checkpoint (``convert``) written as safetensors shards.

* ``plan``: the key, dtype, shape and FP8 scale each tensor is written with (headers only);
* ``values``: the values written, a chunk at a time, from a model or from a checkpoint;
* ``write``: who writes what, the scales (one all-reduce), the shard files;
* ``collective``: the few collectives a sharded save needs;
* ``save``: ``save_pretrained``;
* ``convert``: ``convert_checkpoint`` (``automodel-plugins convert``);
* ``native``: ``convert --layout native``, a checkpoint written in Mistral's native form.
"""
