"""The stock model and what the host does to it, never changing its class.

* ``stock``: the transformers class a config names, built on the meta device;
* ``tensors``: the model's tensors by state-dict name, and the checks that nothing is left unloaded;
* ``placement``: which region of each (DTensor-sharded) tensor this rank holds, and writing into it;
* ``rotary``: recomputing the rotary buffers meta init leaves as garbage;
* ``forward``: the fused-loss forward a plugin binds on the instance;
* ``fp8_resident``: what every FP8-resident module shares: frozen ``uint8`` codes (``Fp8Codes``), the base
  that keeps them and the fp32 scales out of dtype casts (``Fp8Resident``), the dequantizing matmul;
* ``fp8_linear``: ``Fp8Linear``, a frozen linear holding its checkpoint FP8 weight (``dequantize=False``);
* ``fp8_experts``: ``Fp8Experts``, fused MoE experts holding their FP8 weights and block scales;
* ``fp8_grouped``: ``Fp8Experts``' grouped forward: the hit experts dequantized into a reused buffer, one grouped
  matmul;
* ``fp8_lora``: merging PEFT LoRA over ``Fp8Linear`` bases (imports peft);
* ``hf_layout``: what transformers' ``save_pretrained`` writes for a model (keys, order, tied tensors once).
"""
