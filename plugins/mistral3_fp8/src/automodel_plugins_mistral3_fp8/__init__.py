"""automodel-plugins plugin for FP8-native Mistral3 vision-language models."""

__version__ = "0.2.0"
