"""transformers' own FP8 load as it runs on an FP8-capable GPU, reproduced on CPU.

transformers 5.25's ``FineGrainedFP8HfQuantizer`` decides to dequantize in one place only,
``validate_environment``, by the device: without a CUDA/XPU device it switches to ``dequantize=True``. Keeping
``dequantize=False`` past it (what :func:`keep_fp8_on_cpu` does) makes the loader build what it builds on an
H100: an ``FP8Linear`` (``FP8Experts``) for every module the config names FP8, filled from the checkpoint, with
any parameter the checkpoint lacks reported MISSING and left as ``torch.empty``'s memory. Its FP8 forward needs
its Triton kernels, so tests compare the loaded tensors, not logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

__all__ = ["keep_fp8_on_cpu", "stock_fp8_load"]


def keep_fp8_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on in this test, transformers' FP8 loader keeps FP8 on CPU as it does on an FP8 GPU."""
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)


def stock_fp8_load(
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cls: Any = transformers.AutoModelForImageTextToText,
    **kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``cls.from_pretrained(path)`` on transformers' FP8 GPU path, and its loading info (missing keys, ...)."""
    keep_fp8_on_cpu(monkeypatch)
    return cls.from_pretrained(path, output_loading_info=True, **kwargs)
