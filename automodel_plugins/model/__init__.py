"""The stock model and what the host does to it, never changing its class.

* ``stock``: the transformers class a config names, built on the meta device;
* ``tensors``: the model's tensors by state-dict name, and the checks that nothing is left unloaded;
* ``placement``: which region of each (DTensor-sharded) tensor this rank holds, and writing into it;
* ``rotary``: recomputing the rotary buffers meta init leaves as garbage;
* ``forward``: the fused-loss forward a plugin binds on the instance;
* ``fp8_linear``: ``Fp8Linear``, a frozen linear holding its checkpoint FP8 weight (``dequantize=False``);
* ``fp8_lora``: merging PEFT LoRA over ``Fp8Linear`` bases (imports peft).
"""
