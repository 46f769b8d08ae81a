"""The stock model and what the host does to it, never changing its class.

* ``stock``: the transformers class a config names, built on the meta device;
* ``tensors``: the model's tensors by state-dict name, and the checks that nothing is left unloaded;
* ``placement``: which region of each (DTensor-sharded) tensor this rank holds, and writing into it;
* ``device_map``: transformers' ``device_map`` settled on the meta model: the device each tensor is streamed to;
* ``rotary``: recomputing the rotary buffers meta init leaves as garbage;
* ``forward``: the fused-loss forward a plugin binds on the instance;
* ``fsdp_head``: running the fused loss as ``lm_head``'s forward, through FSDP2's hooks on it;
* ``fp8_resident``: what every FP8-resident module shares: frozen ``uint8`` codes (``Fp8Codes``), the base
  that keeps them and the fp32 scales out of dtype casts (``Fp8Resident``), the dequantizing matmul;
* ``fp8_linear``: ``Fp8Linear``, a frozen linear holding its checkpoint FP8 weight (``dequantize=False``);
* ``fp8_tensor_parallel``: ``Fp8Linear``'s forward with its codes split by rows or columns (tensor parallel);
* ``tensor_parallel``: transformers' ``tp_plan`` as torch ``ColwiseParallel`` / ``RowwiseParallel`` (PEFT-aware);
* ``fp8_experts``: ``Fp8Experts``, fused MoE experts holding their FP8 weights and block scales;
* ``expert_tensor_parallel``: ``Fp8Experts`` (or dequantized experts) split over ``tp`` by the intermediate dim,
  every expert's slice on every rank, one all-reduce per MoE layer;
* ``expert_parallel``: transformers' ``ep_plan`` applied with its own EP styles, ``Fp8Experts``' scale grids
  split by expert with their codes;
* ``fp8_grouped``: ``Fp8Experts``' grouped forward: the hit experts dequantized into a reused buffer, one grouped
  matmul;
* ``fp8_experts_delta``: LoRA deltas on ``Fp8Experts``: each run of hit experts formed as dequantized + delta;
* ``fp8_experts_lora``: PEFT's ``ParamWrapper`` (``target_parameters``) over ``Fp8Experts`` (imports peft);
* ``fp8_experts_merge``: merging such a delta back into FP8 codes, the moved experts re-quantized;
* ``fp8_ops``: the FP8 decode and the resident matmul as ``torch.library`` custom ops, for ``torch.compile``;
* ``fp8_lora``: merging PEFT LoRA over ``Fp8Linear`` bases (imports peft);
* ``fp8_peft_hook``: makes PEFT's LoRA over an ``Fp8Linear`` an ``Fp8LoraLinear`` (and its ``ParamWrapper`` over
  ``Fp8Experts`` an ``Fp8ExpertsParamWrapper``), so PEFT's own forward and merge work;
* ``quantization_record``: the config's ``quantization_config`` kept truthful as FP8-resident modules are merged
  away and put back (every LoRA merge and unmerge path);
* ``compressed_tensors_state``: FP8-resident linears of a compressed-tensors source shown and loaded under its
  names and shapes (``weight_scale``, ``input_scale``), so a stock ``save_pretrained`` writes that format;
* ``stock_save_guard``: a stock ``save_pretrained`` refused where its files would say one format and hold another
  (FP8-resident fused experts under a compressed-tensors config);
* ``fp8_training_check``: the warning at an optimizer step that can train no FP8-resident layer;
* ``sharded_merge``: that merge on an FSDP2-sharded model, each rank its own rows (imports peft);
* ``requantize``: float weights re-quantized for FP8-resident modules, for ``load_state_dict``;
* ``hf_layout``: what transformers' ``save_pretrained`` writes for a model (keys, order, tied tensors once).
"""
