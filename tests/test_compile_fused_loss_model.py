"""torch.compile with inductor (CPU) of a whole FP8-resident + LoRA model's training step with labels: the FP8
layers and the fused loss are custom ops, so the compiled forward and backward break no graph (dynamo's own
counters, read after the compiled step) and give eager's loss and gradients."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch
from test_compile_fp8 import checkpoint, resident_lora_model, text_batch
from torch._dynamo.utils import counters

__all__ = ["checkpoint"]  # the FP8 checkpoint fixture, shared with test_compile_fp8
# the module (the package re-exports its function under the same name)
lce = importlib.import_module("automodel_plugins.ops.linear_cross_entropy")


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["block"], indirect=True)
def test_inductor_resident_lora_step_with_the_fused_loss_has_no_graph_break_and_equals_eager(
    checkpoint: Any, plugin_registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    for name in ("_forward_impl", "_forward_grads_impl"):  # the per-token path, or the scalar loss's
        impl = getattr(lce, name)
        monkeypatch.setattr(lce, name, lambda *args, impl=impl: calls.append(1) or impl(*args))
    eager = resident_lora_model(checkpoint, plugin_registry, skip_logits=True)
    compiled_model = copy.deepcopy(eager)
    eager_loss = eager(**text_batch()).loss
    eager_loss.backward()
    compiled_model(**text_batch())  # the one-shot rotary repair runs on the first forward, eagerly
    compiled_model.zero_grad()
    calls.clear()
    torch._dynamo.reset()
    counters.clear()
    loss = torch.compile(compiled_model, backend="inductor")(**text_batch()).loss
    loss.backward()
    assert calls == [1]  # the fused loss ran, once, inside the compiled graph
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    # inductor fuses and reorders the elementwise code around the ops: fp32 rounding, not bit for bit
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected) and len(grads) == 2 * 14
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
