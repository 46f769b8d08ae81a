"""The Mistral3 forward override against the stock forward of the same weights, as the independent reference.

Every test builds two copies of one tiny Mistral3 VLM (image in the batch), binds the override on one, and
compares loss, gradients, logits and outputs with the untouched copy.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from automodel_plugins.model.forward import vlm_fused_loss_forward
from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

IMAGE_TOKEN = 10
IMAGE_TOKENS = 6  # one 32x48 image in 8-pixel patches merged 2x2: (32 // 16) * (48 // 16)
ATOL = 1e-5


# --- tiny model and batch ---------------------------------------------------------------------------------


def tiny_config(vocab_size: int = 256) -> Mistral3Config:
    """A two-layer Ministral3 text model (yarn + llama-4 scaling, as the real ones) under a one-layer Pixtral."""
    return tiny_mistral3_config(vocab_size=vocab_size)


def tiny_model(vocab_size: int = 256, dtype: torch.dtype = torch.float32) -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(tiny_config(vocab_size)).to(dtype).eval()


def image_batch(
    vocab_size: int = 256, seq_len: int = 16, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Two sequences, the first holding the image's tokens; labels ignore the prompt and the image."""
    batch = mistral3_image_batch(tiny_config(vocab_size), seq=seq_len, image_rows=1, dtype=dtype)
    batch["labels"][1, :3] = -100
    return batch


def bind_override(model: Mistral3ForConditionalGeneration) -> Mistral3ForConditionalGeneration:
    """What the host does with the plugin's ``forward_override``: bind on the instance, class untouched."""
    model.forward = types.MethodType(vlm_fused_loss_forward(model), model)
    return model


def stock_and_fused(model: Mistral3ForConditionalGeneration) -> tuple[Any, Any]:
    return copy.deepcopy(model), bind_override(copy.deepcopy(model))


@dataclasses.dataclass
class FakeComposition:
    """Stands in for the host's ``Composition``: only ``options`` is read by the forward."""

    options: dict[str, Any]


def without_labels(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def watched_grads(model: Mistral3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The head, a text decoder projection and the vision projector (the loss reaches it through the image)."""
    return {
        "lm_head": model.lm_head.weight.grad,
        "q_proj": model.model.language_model.layers[0].self_attn.q_proj.weight.grad,
        "projector": model.model.multi_modal_projector.linear_1.weight.grad,
    }


def assert_grads_equal(stock: Any, fused: Any, atol: float = ATOL) -> None:
    for name, expected in watched_grads(stock).items():
        got = watched_grads(fused)[name]
        assert expected is not None and got is not None, name
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=name)


def assert_loss_and_grads_equal(
    stock: Any, fused: Any, batch: dict[str, Any], grad_atol: float = ATOL, **kwargs: Any
) -> tuple[Any, Any]:
    """Stock's and the override's loss on ``batch`` (and ``kwargs``), then their gradients; both outputs."""
    expected, got = stock(**batch, **kwargs), fused(**batch, **kwargs)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    assert_grads_equal(stock, fused, atol=grad_atol)
    return expected, got


@pytest.fixture(scope="module")
def model() -> Mistral3ForConditionalGeneration:
    return tiny_model()


@pytest.fixture
def batch() -> dict[str, Any]:
    return image_batch()


# --- loss and gradients -----------------------------------------------------------------------------------


def test_batch_has_the_image_token_count_stock_expects(model: Any, batch: dict[str, Any]) -> None:
    features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert sum(f.shape[0] for f in features) == IMAGE_TOKENS == int((batch["input_ids"] == IMAGE_TOKEN).sum())


def test_loss_and_gradients_equal_stock(model: Any, batch: dict[str, Any]) -> None:
    expected, got = assert_loss_and_grads_equal(*stock_and_fused(model), batch)
    assert got.loss.dtype == expected.loss.dtype == torch.float32


def test_shift_labels_used_as_given(model: Any, batch: dict[str, Any]) -> None:
    """``shift_labels`` (already aligned with predictions) replaces the shift; stock and fused agree."""
    stock, fused = stock_and_fused(model)
    shift_labels = torch.roll(batch["labels"], -1, dims=1)
    shift_labels[:, -2:] = -100  # differs from the internal shift, so using it is observable
    expected = stock(**batch, shift_labels=shift_labels).loss
    got = fused(**batch, shift_labels=shift_labels).loss
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert abs(got.item() - fused(**batch).loss.item()) > 1e-4


@pytest.mark.parametrize("num_items", [torch.tensor(37), 37])
def test_num_items_in_batch_divides_the_sum(model: Any, batch: dict[str, Any], num_items: Any) -> None:
    assert_loss_and_grads_equal(*stock_and_fused(model), batch, num_items_in_batch=num_items)


def test_bf16_loss_close_to_stock(batch: dict[str, Any]) -> None:
    """bf16 weights: stock rounds the logits to bf16 before its fp32 loss, the op keeps fp32 logits; both
    report an fp32 loss that is not rounded to bf16 (a bf16 loss of ~5.5 moves in steps of 0.03)."""
    stock, fused = stock_and_fused(tiny_model(dtype=torch.bfloat16))
    batch = image_batch(dtype=torch.bfloat16)
    expected, got = stock(**batch), fused(**batch)
    assert got.loss.dtype == torch.float32
    assert got.loss.item() != got.loss.bfloat16().item()
    torch.testing.assert_close(got.loss, expected.loss, atol=5e-3, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(
        fused.lm_head.weight.grad.float(), stock.lm_head.weight.grad.float(), atol=2e-3, rtol=5e-2
    )


# --- logits -----------------------------------------------------------------------------------------------


def test_without_labels_logits_identical_to_stock(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    expected, got = stock(**without_labels(batch)), fused(**without_labels(batch))
    assert got.loss is None
    assert torch.equal(got.logits, expected.logits)


def test_logits_to_keep_int_keeps_last_positions_and_loss_uses_all(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    full = stock(**batch)
    got = fused(**batch, logits_to_keep=1)
    assert got.logits.shape == (2, 1, model.config.text_config.vocab_size)
    torch.testing.assert_close(got.logits, full.logits[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, full.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "keep",
    [
        torch.tensor([0, 5, 15]),
        torch.tensor([[1, 2], [14, 3]]),
        torch.arange(16).remainder(3).eq(0).expand(2, 16).clone(),
    ],
    ids=["1d-positions", "2d-positions", "2d-bool-mask"],
)
def test_logits_to_keep_tensor_as_stock(model: Any, batch: dict[str, Any], keep: torch.Tensor) -> None:
    stock, fused = stock_and_fused(model)
    expected = stock(**without_labels(batch), logits_to_keep=keep).logits
    got = fused(**batch, logits_to_keep=keep)
    assert torch.equal(got.logits, expected)
    torch.testing.assert_close(got.loss, stock(**batch).loss, atol=ATOL, rtol=0)


def test_skip_logits_switch_drops_logits_keeps_loss_and_grads(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    fused.automodel_composition = FakeComposition(options={"skip_logits": True})
    _, got = assert_loss_and_grads_equal(stock, fused, batch)
    assert got.logits is None


def test_skip_logits_switch_leaves_unlabelled_calls_alone(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    fused.automodel_composition = FakeComposition(options={"skip_logits": True})
    assert torch.equal(fused(**without_labels(batch)).logits, stock(**without_labels(batch)).logits)


def test_skip_logits_with_the_host_composition(model: Any, batch: dict[str, Any]) -> None:
    from automodel_plugins.pipeline.composition import COMPOSITION_ATTR, Composition

    fused = bind_override(copy.deepcopy(model))
    setattr(fused, COMPOSITION_ATTR, Composition(plugin="mistral3_fp8", options={"skip_logits": True}))
    assert fused(**batch).logits is None
    getattr(fused, COMPOSITION_ATTR).options["skip_logits"] = False  # read per call, not at bind time
    assert fused(**batch).logits is not None


@pytest.mark.parametrize(
    ("switch", "per_call", "skipped"), [(False, True, True), (True, False, False), (None, None, False)]
)
def test_per_call_skip_logits_overrides_the_switch(
    model: Any, batch: dict[str, Any], switch: bool | None, per_call: bool | None, skipped: bool
) -> None:
    fused = bind_override(copy.deepcopy(model))
    if switch is not None:
        fused.automodel_composition = FakeComposition(options={"skip_logits": switch})
    extra = {} if per_call is None else {"skip_logits": per_call}
    assert (fused(**batch, **extra).logits is None) is skipped


# --- hidden states and outputs ----------------------------------------------------------------------------


def test_hidden_states_is_the_lm_head_input(model: Any, batch: dict[str, Any]) -> None:
    """The final hidden state after the final norm: stock's last ``output_hidden_states`` entry in 5.24
    (``capture_outputs`` ties it to ``last_hidden_state``), and what ``lm_head`` turns into the logits."""
    stock, fused = stock_and_fused(model)
    expected = stock(**batch, output_hidden_states=True).hidden_states[-1]
    got = fused(**batch)
    assert got.hidden_states.shape == (2, 16, model.config.text_config.hidden_size)
    assert torch.equal(got.hidden_states, expected)
    assert torch.equal(fused.lm_head(got.hidden_states), got.logits)
    norm = fused.model.language_model.norm
    assert not torch.allclose(norm(got.hidden_states), got.hidden_states)  # already normed: not pre-norm


def test_hidden_states_full_length_when_logits_are_sliced(model: Any, batch: dict[str, Any]) -> None:
    fused = bind_override(copy.deepcopy(model))
    out = fused(**batch, logits_to_keep=2)
    assert out.hidden_states.shape[:2] == (2, 16) and out.logits.shape[1] == 2


def test_output_hidden_states_keeps_the_stock_tuple(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    expected = stock(**batch, output_hidden_states=True).hidden_states
    got = fused(**batch, output_hidden_states=True).hidden_states
    assert (
        isinstance(got, tuple) and len(got) == len(expected) == model.config.text_config.num_hidden_layers + 1
    )
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_output_class_and_fields_as_stock(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    expected, got = stock(**batch), fused(**batch)
    assert type(got) is type(expected)
    assert got.image_outputs is not None and torch.equal(
        got.image_outputs.pooler_output[0], expected.image_outputs.pooler_output[0]
    )
    assert got.cache.get_seq_length() == expected.cache.get_seq_length() == 16


def test_return_dict_false_gives_the_stock_tuple_head(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    expected = stock(**batch, use_cache=False, return_dict=False)
    got = fused(**batch, use_cache=False, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[2], fused.model(**without_labels(batch)).last_hidden_state)


def test_config_return_dict_false_and_explicit_override(model: Any, batch: dict[str, Any]) -> None:
    fused = bind_override(copy.deepcopy(model))
    fused.config.return_dict = False
    assert isinstance(fused(**batch), tuple)
    assert not isinstance(fused(**batch, return_dict=True), tuple)


def test_positional_arguments_bound_by_the_stock_signature(model: Any, batch: dict[str, Any]) -> None:
    """Stock order: input_ids, pixel_values, attention_mask, ..., labels (7th)."""
    stock, fused = stock_and_fused(model)
    args = (
        batch["input_ids"],
        batch["pixel_values"],
        batch["attention_mask"],
        None,
        None,
        None,
        batch["labels"],
    )
    expected = stock(*args, image_sizes=batch["image_sizes"]).loss
    torch.testing.assert_close(
        fused(*args, image_sizes=batch["image_sizes"]).loss, expected, atol=ATOL, rtol=0
    )


def test_replaced_loss_function_is_refused(model: Any, batch: dict[str, Any]) -> None:
    fused = bind_override(copy.deepcopy(model))
    fused.loss_function = lambda **kwargs: torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="loss_function was replaced"):
        fused(**batch)


# --- the stock contract -----------------------------------------------------------------------------------


def test_signature_and_class_stay_stock(model: Any) -> None:
    stock, fused = stock_and_fused(model)
    assert inspect.signature(fused.forward) == inspect.signature(stock.forward)
    assert type(fused) is Mistral3ForConditionalGeneration
    assert "forward" in vars(fused) and "forward" not in vars(stock)


def test_generate_greedy_equals_stock(model: Any, batch: dict[str, Any]) -> None:
    stock, fused = stock_and_fused(model)
    inputs = without_labels(batch)
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    expected = stock.generate(**inputs, **kwargs)
    got = fused.generate(**inputs, **kwargs)
    assert got.shape == (2, 16 + 3)
    assert torch.equal(got, expected)


def test_plugin_hook_returns_the_override(model: Any, batch: dict[str, Any]) -> None:
    from automodel_plugins_mistral3_fp8 import plugin

    stock, fused = stock_and_fused(model)
    fused.forward = types.MethodType(plugin.forward_override(model=fused, config=fused.config), fused)
    torch.testing.assert_close(fused(**batch).loss, stock(**batch).loss, atol=ATOL, rtol=0)


# --- memory -----------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward run on this thread on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def largest_tensors(model: Any, batch: dict[str, Any]) -> tuple[int, int]:
    """Numel of the largest tensor made in forward, and in backward."""
    with LargestTensor() as fwd:
        loss = model(**batch).loss
    with LargestTensor() as bwd:
        loss.backward()
    return fwd.largest, bwd.largest


def test_skip_logits_never_allocates_batch_by_vocab() -> None:
    """V = 32768, H = 64, 2 x 64 tokens: ``B*S*V`` (4.2M) exceeds the head and its gradient (2.1M) and the
    op's default chunk (4 MiB of fp32 logits = 32 rows = 1M), so only ``[B, S, V]`` could reach it."""
    vocab, seq_len = 32768, 64
    stock, fused = stock_and_fused(tiny_model(vocab_size=vocab))
    fused.automodel_composition = FakeComposition(options={"skip_logits": True})
    batch = image_batch(vocab_size=vocab, seq_len=seq_len)
    full_logits = batch["input_ids"].numel() * vocab
    assert (
        min(largest_tensors(stock, batch)) >= full_logits
    )  # the recorder sees stock's logits and their grad
    fwd, bwd = largest_tensors(fused, batch)
    assert max(fwd, bwd) < full_logits
    assert max(fwd, bwd) <= fused.lm_head.weight.numel()


# --- CUDA -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnCuda:
    """The equality test again where the op runs its chunks on the GPU."""

    def test_loss_and_gradients_equal_stock(self) -> None:
        stock, fused = stock_and_fused(tiny_model().cuda())
        batch = {k: v.cuda() for k, v in image_batch().items()}
        # TF32-free fp32 GEMMs still reorder sums on GPU
        assert_loss_and_grads_equal(stock, fused, batch, grad_atol=1e-4)

    def test_skip_logits_loss_equals_stock_in_bf16(self) -> None:
        stock, fused = stock_and_fused(tiny_model(dtype=torch.bfloat16).cuda())
        fused.automodel_composition = FakeComposition(options={"skip_logits": True})
        batch = {k: v.cuda() for k, v in image_batch(dtype=torch.bfloat16).items()}
        got = fused(**batch)
        assert got.logits is None
        torch.testing.assert_close(got.loss, stock(**batch).loss, atol=3e-2, rtol=1e-2)
