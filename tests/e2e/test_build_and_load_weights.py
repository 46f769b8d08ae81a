"""``build_model`` (meta) -> ``to_empty`` -> ``load_weights``: the path of users who shard before loading.

It must give what ``from_pretrained`` gives: the same weights, rotary buffers restored (by the plugin's
``post_materialize`` after the load, and by the per-rotary hook if ``to_empty`` runs again), equal logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mistral3_checkpoints import (
    ODD,
    PLUGIN,
    TEXT_ROTARY,
    Checkpoints,
    CheckpointSpec,
    ModelSpec,
    assert_rotary_fresh,
    assert_same_weights,
    logits,
    tiny_config,
)
from transformers import Mistral3ForConditionalGeneration

from automodel_plugins import CheckpointError, build_model, from_pretrained, load_weights
from automodel_plugins.errors import UnexpectedKeysError
from automodel_plugins.registry import Registry


def materialize(model: Mistral3ForConditionalGeneration) -> Mistral3ForConditionalGeneration:
    """What a user does before ``load_weights``: real (garbage) memory, then re-tie what ``to_empty`` untied."""
    model.to_empty(device="cpu")
    model.tie_weights()
    return model


def test_build_model_is_on_meta_with_the_composition(registry: Registry, checkpoints: Checkpoints) -> None:
    model = build_model(checkpoints(), registry=registry)
    assert type(model) is Mistral3ForConditionalGeneration
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    composition = model.automodel_composition
    assert composition.plugin == PLUGIN and composition.forward_overridden and composition.load is None
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec",
    [
        CheckpointSpec(),
        CheckpointSpec(model=ModelSpec(tie=True), layout="runtime", shards=3),
        CheckpointSpec(model=ODD, block_size=(32, 32)),
        CheckpointSpec(quantized=False),
    ],
    ids=["per-tensor", "tied-runtime-sharded", "partial-block", "bf16"],
)
def test_load_weights_equals_from_pretrained(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec
) -> None:
    path = checkpoints(spec)
    model = materialize(build_model(path, registry=registry))
    report = load_weights(model, path, registry=registry)
    expected = from_pretrained(path, registry=registry)
    assert_same_weights(model, expected)
    assert_rotary_fresh(model)
    assert torch.equal(logits(model.eval()), logits(expected))
    assert report.tensors == expected.automodel_composition.load.tensors
    assert report.dequantized == expected.automodel_composition.load.dequantized
    assert report.unused_keys_allowed == 0
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is spec.model.tie


def test_hook_repairs_rotary_garbled_after_load_weights(registry: Registry, checkpoints: Checkpoints) -> None:
    """``to_empty`` again after the load (e.g. a second FSDP2 materialization) garbles the rotary buffers;
    the one-shot hook armed on each rotary module restores them at its first forward."""
    path = checkpoints()
    model = materialize(build_model(path, registry=registry))
    load_weights(model, path, registry=registry)
    rotary = model.get_submodule(TEXT_ROTARY)
    rotary.to_empty(device="cpu")  # the buffers' memory is now uninitialized again
    rotary.inv_freq.fill_(float("nan"))
    assert torch.equal(logits(model.eval()), logits(from_pretrained(path, registry=registry)))
    assert_rotary_fresh(model)


def test_hook_alone_repairs_when_load_skips_post_materialize(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """The hook that ``build_model`` installs on meta survives ``to_empty`` and fires on the first forward."""
    path = checkpoints()
    model = materialize(build_model(path, registry=registry))
    assert any(model.get_submodule(TEXT_ROTARY)._forward_pre_hooks.values())
    expected = from_pretrained(path, registry=registry)
    model.load_state_dict(expected.state_dict())
    assert torch.equal(logits(model.eval()), logits(expected))
    assert_rotary_fresh(model)


def test_load_weights_twice(registry: Registry, checkpoints: Checkpoints) -> None:
    """The second load reads the block size from the checkpoint's own config: the model's config no longer
    declares a quantization after the first load."""
    path = checkpoints(block_size=(32, 32))
    model = from_pretrained(path, registry=registry)
    assert getattr(model.config, "quantization_config", None) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    load_weights(model, path, registry=registry)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp8_checkpoint_into_a_model_built_from_bf16(registry: Registry, checkpoints: Checkpoints) -> None:
    model = materialize(build_model(checkpoints(quantized=False), registry=registry))
    path = checkpoints(block_size=(16, 16))
    load_weights(model, path, registry=registry)
    assert_same_weights(model, from_pretrained(path, registry=registry))


def test_load_weights_on_meta_is_refused(registry: Registry, checkpoints: Checkpoints) -> None:
    model = build_model(checkpoints(), registry=registry)
    with pytest.raises(CheckpointError, match="meta device"):
        load_weights(model, checkpoints(), registry=registry)


def test_stage_loads_its_modules_and_counts_the_rest(registry: Registry, checkpoints: Checkpoints) -> None:
    """A pipeline stage holding one of two decoder layers: the other layer's keys are left, and counted."""
    path = checkpoints()
    model = materialize(build_model(tiny_config(ModelSpec(layers=1)), registry=registry))
    with pytest.raises(UnexpectedKeysError, match=r"layers\.1\."):
        load_weights(model, path, registry=registry)
    report = load_weights(model, path, registry=registry, stage=True)
    per_layer = 7 * 3 + 2  # 7 FP8 weights with a scale and an activation scale each, 2 norms
    assert report.unused_keys_allowed == per_layer
    full = from_pretrained(path, registry=registry).state_dict()
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())


def test_build_model_from_a_path_and_from_its_config_agree(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    from automodel_plugins.sources import load_config

    path: Path = checkpoints()
    a, b = build_model(path, registry=registry), build_model(load_config(path), registry=registry)
    assert [(n, t.shape, t.dtype) for n, t in a.state_dict().items()] == [
        (n, t.shape, t.dtype) for n, t in b.state_dict().items()
    ]
