"""The text and vision rotary buffers after loading: bit-identical to a freshly built model's, in fp32, before
any forward, and repaired again by the per-module hook when something garbles them later (FSDP2's to_empty)."""

from __future__ import annotations

import pytest
import torch
from mistral3_checkpoints import (
    TEXT_ROTARY,
    VISION_ROTARY,
    Checkpoints,
    CheckpointSpec,
    ModelSpec,
    assert_rotary_fresh,
    image_inputs,
    logits,
    rotary_state,
    stock_load,
)

from automodel_plugins import from_pretrained
from automodel_plugins.registry import Registry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "spec",
    [CheckpointSpec(), CheckpointSpec(quantized=False, layout="runtime")],
    ids=["fp8-legacy", "bf16-runtime"],
)
def test_rotary_buffers_equal_a_fresh_model_before_any_forward(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, dtype: torch.dtype
) -> None:
    model = from_pretrained(checkpoints(spec), registry=registry, dtype=dtype)
    assert_rotary_fresh(model)


def test_rotary_buffers_equal_stock_loaded(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints()
    ours, stock = rotary_state(from_pretrained(path, registry=registry)), rotary_state(stock_load(path))
    assert ours.keys() == stock.keys()
    for name, value in stock.items():
        assert torch.equal(ours[name], value) if isinstance(value, torch.Tensor) else ours[name] == value, (
            name
        )


def test_rotary_buffers_are_real_frequencies(registry: Registry, checkpoints: Checkpoints) -> None:
    """Guards the comparison itself: finite, positive, and not the NaN poison the host fills buffers with."""
    model = from_pretrained(checkpoints(), registry=registry)
    for name, value in rotary_state(model).items():
        if isinstance(value, torch.Tensor):
            assert value.numel() and torch.isfinite(value).all() and (value > 0).all(), name


def test_rotary_modules_carry_the_repair_hook_after_load(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    from automodel_plugins.model.rotary import find_rotary_modules

    model = from_pretrained(checkpoints(), registry=registry)
    found = {name: module for name, module in find_rotary_modules(model)}
    assert set(found) == {TEXT_ROTARY, VISION_ROTARY}
    assert all(module._forward_pre_hooks for module in found.values())


def _garble(model: torch.nn.Module) -> None:
    """What ``to_empty()`` after loading does to non-persistent buffers: arbitrary memory (here: garbage)."""
    for path in (TEXT_ROTARY, VISION_ROTARY):
        module = model.get_submodule(path)
        for name in ("inv_freq", "original_inv_freq"):
            module.get_buffer(name).fill_(12345.0)


def test_garbled_buffers_are_repaired_at_first_forward(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints(model=ModelSpec(tie=True))
    model = from_pretrained(path, registry=registry)
    _garble(model)
    assert torch.equal(logits(model), logits(stock_load(path)))
    assert_rotary_fresh(model)


def test_repair_fires_when_only_the_text_model_runs(registry: Registry, checkpoints: Checkpoints) -> None:
    """A pipeline stage calls the language model alone: the hook sits on the rotary module, so it fires."""
    path = checkpoints()
    model, stock = from_pretrained(path, registry=registry), stock_load(path)
    _garble(model)
    embeds = stock.get_input_embeddings()(image_inputs()["input_ids"])
    with torch.no_grad():
        got = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = stock.model.language_model(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(got, expected)
    text = model.get_submodule(TEXT_ROTARY)
    assert torch.equal(text.inv_freq, stock.get_submodule(TEXT_ROTARY).inv_freq)
