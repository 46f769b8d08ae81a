"""automodel-plugins plugin for block-FP8 Qwen3-VL-MoE vision-language models."""

__version__ = "0.2.0"
