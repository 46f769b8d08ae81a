"""The host's fused-loss forward builder on stock text-only and VLM classes, each checked against its own
stock forward: the builder knows no model, so any causal LM whose base model sits at ``base_model`` works."""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3VLForConditionalGeneration,
)
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from automodel_plugins.model.forward import (
    causal_lm_fused_loss,
    fused_loss_forward,
    slice_positions,
    stock_output_class,
    unfusable_head_reason,
)
from automodel_plugins.testing.tiny_models import (
    QWEN3_VL_IMAGE_TOKEN_ID,
    QWEN3_VL_VISION_END_TOKEN_ID,
    QWEN3_VL_VISION_START_TOKEN_ID,
    TINY_TEXT_SIZES,
    tiny_qwen3_vl_config,
)

ATOL = 1e-5
VOCAB = TINY_TEXT_SIZES["vocab_size"]
SEQ = 12
TEXT = {**TINY_TEXT_SIZES, "tie_word_embeddings": False}


# --- tiny stock models and their batches ------------------------------------------------------------------


def text_batch() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def mistral() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**TEXT)).eval(), text_batch()


def llama() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TEXT)).eval(), text_batch()


def qwen3_vl() -> tuple[nn.Module, dict[str, Any]]:
    """Qwen3-VL with one 4x4-patch image (4 tokens after the 2x2 merge), 3-D rope positions and deepstack."""
    torch.manual_seed(0)
    config = tiny_qwen3_vl_config(rope_theta=1e6, num_position_embeddings=16)
    batch = text_batch()
    start, image, end = QWEN3_VL_VISION_START_TOKEN_ID, QWEN3_VL_IMAGE_TOKEN_ID, QWEN3_VL_VISION_END_TOKEN_ID
    batch["input_ids"].clamp_(max=end - 1)
    batch["input_ids"][0, 2:8] = torch.tensor([start, *[image] * 4, end])
    batch["labels"] = torch.where(batch["labels"] == -100, -100, batch["input_ids"])
    gen = torch.Generator().manual_seed(2)
    batch["pixel_values"] = torch.randn(16, 3 * 2 * 8 * 8, generator=gen)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    batch["mm_token_type_ids"] = (batch["input_ids"] == image).int()
    return Qwen3VLForConditionalGeneration(config).eval(), batch


def text_vocab(config: Any) -> int:
    """Where the vocabulary lives: the text sub-config of a VLM, the config itself otherwise."""
    return getattr(config, "text_config", config).vocab_size


FACTORIES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "mistral": mistral,
    "llama": llama,
    "qwen3_vl": qwen3_vl,
}


def decoder_projection(model: nn.Module) -> str:
    """The first text decoder layer's query projection, wherever the class nests its decoder."""
    return next(
        name for name, _ in model.named_parameters() if name.endswith("layers.0.self_attn.q_proj.weight")
    )


def bind(model: nn.Module, **options: Any) -> nn.Module:
    builder = fused_loss_forward(type(model).forward, vocab_size=text_vocab, **options)
    model.forward = types.MethodType(builder, model)
    return model


def without_labels(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(params=list(FACTORIES))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(stock, overridden, batch): two copies of the same weights."""
    model, batch = FACTORIES[request.param]()
    return model, bind(copy.deepcopy(model)), batch


# --- any stock causal LM ----------------------------------------------------------------------------------


def test_loss_and_gradients_equal_stock(case: tuple[nn.Module, nn.Module, dict[str, Any]]) -> None:
    stock, fused, batch = case
    expected, got = stock(**batch), fused(**batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    for name in ("lm_head.weight", decoder_projection(stock)):
        torch.testing.assert_close(
            fused.get_parameter(name).grad, stock.get_parameter(name).grad, atol=ATOL, rtol=0, msg=name
        )


def test_logits_and_output_class_as_stock(case: tuple[nn.Module, nn.Module, dict[str, Any]]) -> None:
    stock, fused, batch = case
    expected, got = stock(**without_labels(batch)), fused(**without_labels(batch))
    assert type(got) is type(expected)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(fused.lm_head(got.hidden_states), got.logits)


def test_skip_logits_per_call(case: tuple[nn.Module, nn.Module, dict[str, Any]]) -> None:
    stock, fused, batch = case
    got = fused(**batch, skip_logits=True)
    assert got.logits is None
    torch.testing.assert_close(got.loss, stock(**batch).loss, atol=ATOL, rtol=0)


def test_generate_and_signature_as_stock(case: tuple[nn.Module, nn.Module, dict[str, Any]]) -> None:
    stock, fused, batch = case
    assert inspect.signature(fused.forward) == inspect.signature(stock.forward)
    assert type(fused) is type(stock)
    kwargs = {"max_new_tokens": 3, "do_sample": False}
    assert torch.equal(
        fused.generate(**without_labels(batch), **kwargs), stock.generate(**without_labels(batch), **kwargs)
    )


def test_return_dict_false(case: tuple[nn.Module, nn.Module, dict[str, Any]]) -> None:
    stock, fused, batch = case
    expected = stock(**batch, use_cache=False, return_dict=False)
    got = fused(**batch, use_cache=False, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    assert torch.equal(got[1], expected[1])


# --- loss semantics ---------------------------------------------------------------------------------------


def test_lm_head_bias_enters_loss_and_gets_its_gradient() -> None:
    stock, batch = llama()
    stock.lm_head = nn.Linear(TEXT["hidden_size"], VOCAB, bias=True)
    nn.init.normal_(stock.lm_head.bias)
    fused = bind(copy.deepcopy(stock))
    expected, got = stock(**batch), fused(**batch, skip_logits=True)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(fused.lm_head.bias.grad, stock.lm_head.bias.grad, atol=ATOL, rtol=0)


def test_all_labels_ignored_gives_zero_loss_not_nan() -> None:
    """A deliberate difference: stock's mean over zero labels is NaN, which poisons a whole accumulation step."""
    stock, batch = mistral()
    batch["labels"].fill_(-100)
    assert torch.isnan(stock(**batch).loss)
    got = bind(stock)(**batch).loss
    assert got.item() == 0.0
    got.backward()
    assert not stock.lm_head.weight.grad.any()


@pytest.mark.parametrize("num_items", [None, 11, torch.tensor(11)])
@pytest.mark.parametrize("given_shift", [False, True])
def test_causal_lm_fused_loss_equals_for_causal_lm_loss(num_items: Any, given_shift: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    head = nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    labels[0, 3:] = -100
    shift = torch.randint(0, 50, (2, 7), generator=gen) if given_shift else None
    expected = ForCausalLMLoss(head(hidden), labels, 50, num_items_in_batch=num_items, shift_labels=shift)
    got = causal_lm_fused_loss(hidden, head, labels, shift_labels=shift, num_items_in_batch=num_items)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    (grad_expected,) = torch.autograd.grad(expected, hidden)
    (grad_got,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(grad_got, grad_expected, atol=ATOL, rtol=0)


def test_memory_budget_reaches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    import automodel_plugins.model.forward as forward_module

    seen: list[Any] = []
    real = forward_module.linear_cross_entropy

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs["memory_budget_bytes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module, "linear_cross_entropy", spy)
    stock, batch = llama()
    fused = bind(copy.deepcopy(stock), memory_budget_bytes=4096)
    torch.testing.assert_close(fused(**batch).loss, stock(**batch).loss, atol=ATOL, rtol=0)
    assert seen == [4096]


# --- builder pieces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep",
    [
        0,
        3,
        torch.tensor([0, 4, 11]),
        torch.tensor([[1, 2], [9, 0]]),
        torch.arange(SEQ).remainder(4).eq(1).expand(2, SEQ),
    ],
    ids=["int-all", "int-last-3", "1d", "2d-positions", "2d-bool"],
)
def test_slice_positions_matches_transformers(keep: int | torch.Tensor) -> None:
    hidden = torch.randn(2, SEQ, 8)
    assert torch.equal(slice_positions(hidden, keep), slice_logits_to_keep(hidden, keep))


def test_stock_output_class_from_the_return_annotation() -> None:
    assert stock_output_class(LlamaForCausalLM.forward) is CausalLMOutputWithPast

    def unannotated(self: Any, input_ids: Any = None) -> Any: ...

    with pytest.raises(TypeError, match="output_class="):
        stock_output_class(unannotated)


def test_explicit_output_class_and_bound_method() -> None:
    """A bound stock method works as well as the class function; ``output_class`` skips the annotation."""
    stock, batch = llama()
    fused = copy.deepcopy(stock)
    builder = fused_loss_forward(fused.forward, vocab_size=VOCAB, output_class=CausalLMOutputWithPast)
    fused.forward = types.MethodType(builder, fused)
    assert inspect.signature(fused.forward) == inspect.signature(stock.forward)
    torch.testing.assert_close(fused(**batch).loss, stock(**batch).loss, atol=ATOL, rtol=0)


def test_vocab_size_mismatch_with_the_head_is_refused() -> None:
    model, batch = llama()
    model.forward = types.MethodType(fused_loss_forward(type(model).forward, vocab_size=VOCAB * 2), model)
    with pytest.raises(RuntimeError, match="full"):
        model(**batch)
    assert model(**without_labels(batch)).logits.shape[-1] == VOCAB  # unlabelled calls never read the head


def test_deprecated_past_key_values_name_still_reaches_the_cache() -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and still accepts the old keyword."""
    stock, batch = llama()
    fused = bind(copy.deepcopy(stock))
    inputs = without_labels(batch)
    prefix = {k: v[:, :-1] for k, v in inputs.items()}
    last = {k: v[:, -1:] for k, v in inputs.items() if k == "input_ids"}
    cache = fused(**prefix, use_cache=True).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        step = fused(**last, attention_mask=inputs["attention_mask"], past_key_values=cache)
    torch.testing.assert_close(step.logits[:, -1], stock(**inputs).logits[:, -1], atol=ATOL, rtol=0)


@pytest.fixture
def single_rank_mesh() -> Any:
    """A one-rank gloo process group and CPU mesh, torn down after the test."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_head_is_refused(single_rank_mesh: Any) -> None:
    """A plain Linear whose weight is a DTensor at forward time (tensor parallel) is not the full head."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model, batch = llama()
    bind(model)
    model.lm_head.weight = nn.Parameter(
        distribute_tensor(model.lm_head.weight.detach(), single_rank_mesh, [Shard(0)])
    )
    with pytest.raises(RuntimeError, match="DTensor"):
        model(**batch, skip_logits=True)


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_head_as_its_own_fsdp2_unit_keeps_the_fused_loss(single_rank_mesh: Any, reshard: bool) -> None:
    """``fully_shard(lm_head)`` unshards the head only inside ``lm_head``'s hooks: the loss runs as its forward,
    through them (no warning, no logits), and equals stock's, gradient included (issue 21 item 3)."""
    from torch.distributed.fsdp import fully_shard

    stock, batch = llama()
    fused = bind(copy.deepcopy(stock))
    fully_shard(fused.lm_head, mesh=single_rank_mesh, reshard_after_forward=reshard)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = fused(**batch, skip_logits=True)
    assert got.logits is None
    expected = stock(**batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    got.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(
        fused.lm_head.weight.grad.full_tensor(), stock.lm_head.weight.grad, atol=ATOL, rtol=0
    )
    assert "forward" not in fused.lm_head.__dict__  # the stand-in forward lasted one call


def test_head_whose_fsdp2_output_dtype_would_round_the_loss_falls_back(single_rank_mesh: Any) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    stock, batch = llama()
    fused = bind(copy.deepcopy(stock))
    policy = MixedPrecisionPolicy(output_dtype=torch.bfloat16)
    fully_shard(fused.lm_head, mesh=single_rank_mesh, mp_policy=policy)
    with pytest.warns(UserWarning, match="casts its output to torch.bfloat16"):
        got = fused(**batch, skip_logits=True)
    assert got.logits is not None and got.logits.dtype == torch.bfloat16


def test_user_hook_next_to_fsdp2_hooks_still_falls_back(single_rank_mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    stock, batch = llama()
    fused = bind(copy.deepcopy(stock))
    fully_shard(fused.lm_head, mesh=single_rank_mesh)
    hooked_head(fused)
    with pytest.warns(UserWarning, match="forward hooks"):
        got = fused(**batch, skip_logits=True)
    assert got.logits is not None


# --- heads the fused loss cannot stand in for: the stock loss, with one warning ---------------------------


class LowRankHead(nn.Module):
    """What a LoRA adapter on ``lm_head`` looks like to the forward: not an ``nn.Linear``, but with ``weight``."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class TemperatureLinear(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 0.7


def low_rank_head(model: nn.Module) -> None:
    model.lm_head = LowRankHead(model.lm_head)


def temperature_head(model: nn.Module) -> None:
    head = TemperatureLinear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head


def hooked_head(model: nn.Module) -> None:
    model.lm_head.register_forward_hook(lambda module, args, out: out * 1.5)


def pre_hooked_head(model: nn.Module) -> None:
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))


def instance_forward_head(model: nn.Module) -> None:
    """What accelerate's ``add_hook_to_module`` (device maps, offload) does: a forward set on the instance."""
    import types

    def scaled(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x) * 1.5

    model.lm_head.forward = types.MethodType(scaled, model.lm_head)  # deepcopy rebinds it to the copy


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (low_rank_head, "LowRankHead, not an nn.Linear"),
        (temperature_head, "TemperatureLinear overrides nn.Linear.forward"),
        (hooked_head, "forward hooks"),
        (pre_hooked_head, "forward hooks"),
        (instance_forward_head, "forward is replaced on the instance"),
    ],
    ids=["wrapped", "subclass-forward", "forward-hook", "pre-hook", "instance-forward"],
)
def test_unfusable_head_falls_back_to_stock_loss_with_one_warning(
    change: Callable[[nn.Module], None], reason: str
) -> None:
    stock, batch = llama()
    change(stock)
    assert reason in unfusable_head_reason(stock.lm_head)
    fused = bind(copy.deepcopy(stock))
    with pytest.warns(UserWarning, match=reason):
        got = fused(**batch, skip_logits=True)
    expected = stock(**batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    assert got.logits is not None  # stock's output, logits included
    got.loss.backward()
    expected.loss.backward()
    for name, param in stock.named_parameters():
        if name.startswith("lm_head") or name == decoder_projection(stock):
            torch.testing.assert_close(
                fused.get_parameter(name).grad, param.grad, atol=ATOL, rtol=0, msg=name
            )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(**batch)  # warned once per model
    assert torch.equal(fused(**without_labels(batch)).logits, stock(**without_labels(batch)).logits)


def test_parametrized_linear_head_stays_fused() -> None:
    """A parametrization keeps ``nn.Linear.forward`` and exposes the effective ``weight``: still fused."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * 2

    stock, batch = llama()
    parametrize.register_parametrization(stock.lm_head, "weight", Doubled())
    assert unfusable_head_reason(stock.lm_head) is None
    fused = bind(copy.deepcopy(stock))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fused(**batch, skip_logits=True)
    assert got.logits is None
    torch.testing.assert_close(got.loss, stock(**batch).loss, atol=ATOL, rtol=0)
