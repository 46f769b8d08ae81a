"""``torch.compile`` of FP8-resident layers: the decode and the resident matmul are custom ops
(``automodel_plugins::fp8_dequantize``, ``automodel_plugins::fp8_linear`` and its input-gradient op), so dynamo
keeps them inside one graph, and a compiled step equals the eager one.

Before the ops, every FP8 layer broke the graph a few times (the CPU decode goes through numpy and ctypes, the
non-finite check reads values): 51 breaks in the FP8 code of the tiny model below (per-tensor scales), 61 with
block scales. The references are eager runs of the same objects, whose exactness against a dequantized model
the other FP8 tests establish.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.fp8 import quantize
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # inductor compiles: seconds each warm, ~10-30 s from a cold cache

F32 = torch.float32
FP8_CODE = ("automodel_plugins/fp8/", "automodel_plugins/model/fp8_")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def breaks_in(explanation: Any, paths: tuple[str, ...]) -> list[str]:
    """The graph-break reasons whose user stack passes through a file under ``paths``."""
    return [
        f"{reason.reason.splitlines()[0]} at {reason.user_stack[-1].filename}:{reason.user_stack[-1].lineno}"
        for reason in explanation.break_reasons
        if any(any(p in frame.filename for p in paths) for frame in reason.user_stack)
    ]


def fp8_layer(out_features: int, in_features: int, block: tuple[int, int] | None) -> Fp8Linear:
    g = torch.Generator().manual_seed(0)
    codes, scale = quantize(torch.randn(out_features, in_features, generator=g) * 0.1, block_size=block)
    bias = torch.randn(out_features, generator=g)
    return Fp8Linear.from_fp8(codes, scale, block_size=block, bias=bias, compute_dtype=F32)


# --- one layer ----------------------------------------------------------------------------------------------

# 96 x 128: the CPU table-lookup decode (numpy, ctypes) applies; 72 x 100 with 32-blocks: partial edge blocks
LAYERS = {"per-tensor": (96, 128, None), "block": (72, 100, (32, 32)), "row-chunked": (96, 128, (32, 32))}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fp8_linear_forward_and_backward_compile_to_one_graph_equal_to_eager(kind: str) -> None:
    out_features, in_features, block = LAYERS[kind]
    layer = fp8_layer(out_features, in_features, block)
    if kind == "row-chunked":
        layer.dequant_budget_bytes = 40 * in_features * 4  # 40-row blocks: 3 matmuls, the last partial

    def step(x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, in_features, generator=g)
    grad = torch.randn(3, 5, out_features, generator=g)
    assert torch._dynamo.explain(step)(x.requires_grad_()).graph_break_count == 0

    eager_x, compiled_x = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    expected = step(eager_x)
    expected.backward(grad)
    expected_bias_grad, layer.bias.grad = layer.bias.grad, None
    got = torch.compile(step, fullgraph=True, backend="inductor")(compiled_x)
    got.backward(grad)
    assert torch.equal(got, expected)  # the same eager code inside the op: bit for bit
    assert torch.equal(compiled_x.grad, eager_x.grad)
    # the bias gradient is a plain sum over the tokens in the backward graph: inductor writes its own reduction
    torch.testing.assert_close(layer.bias.grad, expected_bias_grad, rtol=2e-7, atol=1e-6)
    assert layer.weight.grad is None


def test_the_compiled_backward_saves_only_the_codes_and_the_scale() -> None:
    layer = fp8_layer(96, 128, (32, 32))
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    compiled = torch.compile(lambda x: layer(x), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = compiled(x)
    out.sum().backward()
    assert ((96, 128), torch.uint8) in saved
    assert not [entry for entry in saved if entry[0] in ((96, 128), (128, 96)) and entry[1].is_floating_point]


def test_dequantized_weight_compiles_to_the_decode_op() -> None:
    layer = fp8_layer(72, 100, (32, 32))
    compiled = torch.compile(lambda module: module.dequantized_weight(), fullgraph=True, backend="inductor")
    assert torch.equal(compiled(layer), layer.dequantized_weight())


# --- a model: FP8-resident Mistral3 + PEFT LoRA ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["per-tensor", "block"])
def checkpoint(request: pytest.FixtureRequest, fp8_checkpoint_factory: Any) -> Path:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config(intermediate_size=136)).eval()
    block = (32, 32) if request.param == "block" else None
    return fp8_checkpoint_factory(model, name=f"mistral3-{request.param}", block_size=block)


def resident_lora_model(checkpoint: Path, plugin_registry: Any, *, skip_logits: bool) -> nn.Module:
    model = automodel_plugins.from_pretrained(
        checkpoint,
        dtype=F32,
        dequantize=False,
        skip_logits=skip_logits,
        registry=plugin_registry("mistral3_fp8"),
    )
    assert len(model.automodel_composition.fp8_resident) == 14
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def text_batch() -> dict[str, torch.Tensor]:
    batch = mistral3_image_batch(tiny_mistral3_config(), batch=2, seq=15, image_rows=0)
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


def test_resident_lora_model_has_no_graph_break_in_the_fp8_code(
    checkpoint: Path, plugin_registry: Any
) -> None:
    """With the fused loss a custom op too (issue 21.6), the whole model with ``skip_logits=False`` (the output
    composition of ``model/forward.py`` included) is one graph: no break in the FP8 layers, none anywhere."""
    model = resident_lora_model(checkpoint, plugin_registry, skip_logits=False)
    model(**text_batch())  # the one-shot rotary repair runs on the first forward, eagerly
    explanation = torch._dynamo.explain(model)(**text_batch())
    assert breaks_in(explanation, FP8_CODE) == []
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_resident_lora_step_equals_eager(checkpoint: Path, plugin_registry: Any) -> None:
    """AOTAutograd traces forward and backward through the ops' fake implementations and their autograd
    (``aot_eager`` runs the traced aten graph as is, so the results are bit for bit)."""
    eager = resident_lora_model(checkpoint, plugin_registry, skip_logits=True)
    compiled_model = copy.deepcopy(eager)
    eager_loss = eager(**text_batch()).loss
    eager_loss.backward()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    compiled_model(**text_batch())  # the eager first forward (rotary repair) on this copy too
    compiled_model.zero_grad()
    loss = compiled(**text_batch()).loss
    loss.backward()
    assert torch.equal(loss, eager_loss)
    grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected) and len(grads) == 2 * 14
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name
