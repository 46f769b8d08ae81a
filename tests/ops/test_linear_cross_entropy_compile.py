"""torch.compile of the fused loss: the op is a torch.library custom op (host syncs inside, a fake kernel for
shapes, its own backward), so a compiled caller is one graph and gives eager's loss and gradients."""

from __future__ import annotations

import types

import pytest
import torch
import torch._dynamo
from transformers import MistralConfig, MistralForCausalLM

from automodel_plugins.model.forward import fused_loss_forward
from automodel_plugins.ops import linear_cross_entropy
from automodel_plugins.testing.tiny_models import TINY_TEXT_SIZES

from .test_linear_cross_entropy import IGNORE, make_inputs


def loss_fn(x, w, t, b, normalizer, reduction: str, softcap: float | None):
    out = linear_cross_entropy(
        x, w, t, bias=b, reduction=reduction, normalizer=normalizer, softcap=softcap, chunk_size=(5, 16)
    )
    return out.sum() * 3.0  # a grad_output != 1 (and, for "none", through a sum)


CASES = [
    pytest.param(torch.float32, "mean", None, None, id="fp32-mean"),
    pytest.param(torch.bfloat16, "mean", None, None, id="bf16-mean"),
    pytest.param(torch.float32, "none", None, 2.0, id="fp32-none-softcap"),
    pytest.param(torch.bfloat16, "sum", torch.tensor(40.0), None, id="bf16-sum-tensor-normalizer"),
]


@pytest.mark.parametrize(("dtype", "reduction", "normalizer", "softcap"), CASES)
def test_no_graph_breaks(dtype, reduction, normalizer, softcap) -> None:
    case = make_inputs((2, 11), 16, 37, dtype=dtype, bias=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_fn)(
        case["x"], case["w"], case["t"], case["b"], normalizer, reduction, softcap
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize(("dtype", "reduction", "normalizer", "softcap"), CASES[2:])  # inductor: seconds each
def test_compiled_equals_eager(dtype, reduction, normalizer, softcap) -> None:
    eager, compiled = (make_inputs((2, 11), 16, 37, dtype=dtype, bias=True) for _ in range(2))
    torch._dynamo.reset()
    fn = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    outputs = []
    for case, call in ((eager, loss_fn), (compiled, fn)):
        loss = call(case["x"], case["w"], case["t"], case["b"], normalizer, reduction, softcap)
        loss.backward()
        outputs.append(loss)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for name in ("x", "w", "b"):
        torch.testing.assert_close(compiled[name].grad, eager[name].grad, rtol=0, atol=0)


def test_compiled_frozen_head_and_all_ignored() -> None:
    """needs_input_grad reaches the compiled backward (no weight gradient for a frozen head); an all-ignored
    batch gives 0 and zero gradients, as in eager."""
    case = make_inputs((9,), 8, 21)
    case["w"].requires_grad_(False)
    case["t"].fill_(IGNORE)
    torch._dynamo.reset()
    fn = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # the autograd split, without codegen
    loss = fn(case["x"], case["w"], case["t"], None, None, "mean", None)
    loss.backward()
    assert loss.item() == 0.0
    assert case["w"].grad is None
    assert torch.equal(case["x"].grad, torch.zeros_like(case["x"]))


def fused_mistral() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_TEXT_SIZES, tie_word_embeddings=False)).eval()
    vocab = TINY_TEXT_SIZES["vocab_size"]
    model.forward = types.MethodType(fused_loss_forward(type(model).forward, vocab_size=vocab), model)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (2, 12), generator=gen)
    labels = input_ids.clone()
    labels[0, :4] = IGNORE
    return model, {"input_ids": input_ids, "labels": labels, "num_items_in_batch": torch.tensor(17)}


@pytest.mark.slow  # inductor on a whole (tiny) model: ~15 s
def test_model_fused_forward_compiles_to_one_graph_equal_to_eager() -> None:
    model, batch = fused_mistral()

    def step(**kwargs):
        return model(**kwargs, skip_logits=True).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(**batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager_loss = step(**batch)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled_loss = torch.compile(step, backend="inductor")(**batch)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
