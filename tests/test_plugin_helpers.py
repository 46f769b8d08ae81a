"""The hook bodies plugins share, on plain configs: the FP8-or-unquantized claim
(``automodel_plugins.fp8.quantization``) and the VLM fused-loss forward (``automodel_plugins.model.forward``)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types
from typing import Any

import pytest

from automodel_plugins import Claim, Decline
from automodel_plugins.fp8.quantization import claim_fp8_or_unquantized, describe_fp8
from automodel_plugins.model.forward import text_vocab_size, vlm_fused_loss_forward


def config(quantization: Any = None, **fields: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(quantization_config=quantization, **fields)


@pytest.mark.parametrize(
    ("quantization", "described"),
    [
        ({"weight_block_size": [128, 128]}, "128x128 block FP8 weights"),
        ({"weight_block_size": None}, "per-tensor FP8 weights"),
        ({}, "per-tensor FP8 weights"),
        ({"weight_block_size": "128"}, "'128' block FP8 weights"),
    ],
)
def test_describe_fp8(quantization: dict[str, Any], described: str) -> None:
    assert describe_fp8(quantization) == described


def test_claim_unquantized_fp8_and_other_methods() -> None:
    assert claim_fp8_or_unquantized(config(), "m") == Claim(reason="m, unquantized")
    fp8 = config({"quant_method": "fp8", "weight_block_size": [64, 32]})
    assert claim_fp8_or_unquantized(fp8, "m", priority=3) == Claim(
        reason="m, 64x32 block FP8 weights", priority=3
    )
    assert claim_fp8_or_unquantized(config({"quant_method": "awq"}), "m") == Decline(
        reason="m with quant_method 'awq': only FP8 or unquantized is served"
    )


def test_text_vocab_size_prefers_the_text_config() -> None:
    assert text_vocab_size(config(text_config=types.SimpleNamespace(vocab_size=7), vocab_size=9)) == 7
    assert text_vocab_size(config(vocab_size=9)) == 9


def test_vlm_fused_loss_forward_keeps_the_stock_signature() -> None:
    from transformers import Qwen3VLForConditionalGeneration

    model = type("Fake", (), {"forward": Qwen3VLForConditionalGeneration.forward})()
    forward = vlm_fused_loss_forward(model)
    assert inspect.signature(forward) == inspect.signature(Qwen3VLForConditionalGeneration.forward)


def test_claim_helper_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, automodel_plugins; automodel_plugins.claim_fp8_or_unquantized; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
