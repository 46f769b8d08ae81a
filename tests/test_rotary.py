"""Rotary buffer repair against an independent reference: the buffers of a freshly constructed stock model."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from automodel_plugins.errors import RotaryRepairError
from automodel_plugins.model.rotary import (
    find_rotary_modules,
    install_rotary_repair_hooks,
    is_rotary_module,
    recompute_rotary_buffers,
    repair_rotary,
)
from automodel_plugins.testing.tiny_models import (
    MINISTRAL3_ROPE_PARAMETERS,
    TINY_TEXT_SIZES,
    mistral3_image_batch,
    tiny_mistral3_config,
    tiny_qwen3_vl_config,
)

# Without mscale the YaRN attention factor is 0.1 * ln(16) + 1, so a lost attention_scaling is visible.
YARN_SCALED = {k: v for k, v in MINISTRAL3_ROPE_PARAMETERS.items() if k not in ("mscale", "mscale_all_dim")}
TEXT_ROTARY = "model.language_model.rotary_emb"
VISION_ROTARY = "model.vision_tower.patch_positional_embedding"


# --- tiny models ------------------------------------------------------------------------------------------


def mistral3_config(rope: dict[str, Any] | None = None) -> transformers.Mistral3Config:
    return tiny_mistral3_config(rope_parameters=rope or MINISTRAL3_ROPE_PARAMETERS)


def mistral_config() -> transformers.MistralConfig:
    return transformers.MistralConfig(**TINY_TEXT_SIZES, tie_word_embeddings=False)


def gemma3_config() -> transformers.Gemma3TextConfig:
    """Per-layer-type tables: ``sliding_attention_inv_freq`` instead of ``inv_freq``."""
    return transformers.Gemma3TextConfig(**TINY_TEXT_SIZES, tie_word_embeddings=False)


MODELS: dict[str, tuple[type[nn.Module], Callable[[], Any], set[str]]] = {
    "mistral3": (
        transformers.Mistral3ForConditionalGeneration,
        mistral3_config,
        {TEXT_ROTARY, VISION_ROTARY},
    ),
    "mistral": (transformers.MistralForCausalLM, mistral_config, {"model.rotary_emb"}),
    "gemma3": (transformers.Gemma3ForCausalLM, gemma3_config, {"model.rotary_emb"}),
    "qwen3vl": (
        transformers.Qwen3VLForConditionalGeneration,
        tiny_qwen3_vl_config,
        {"model.language_model.rotary_emb", "model.visual.rotary_pos_emb"},
    ),
}


def fresh(cls: type[nn.Module], config: Any) -> nn.Module:
    torch.manual_seed(0)
    return cls(config)


def meta_materialized(cls: type[nn.Module], config: Any, *, hooks: bool = False) -> nn.Module:
    """The FSDP2-style path: build on meta, (optionally arm the hooks), ``to_empty``, then garble the buffers."""
    with torch.device("meta"):
        model = cls(config)
    if hooks:
        install_rotary_repair_hooks(model)
    model.to_empty(device="cpu")
    garble(model)
    return model


def garble(model: nn.Module, value: float = math.nan) -> None:
    """What ``to_empty`` may leave behind, made deterministic."""
    for _, module in find_rotary_modules(model):
        for name, buffer in module._buffers.items():
            if name.endswith("inv_freq"):
                buffer.fill_(value)
        for name in list(vars(module)):
            if name.endswith("attention_scaling"):
                setattr(module, name, 123.0)


def rotary_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for name, module in find_rotary_modules(model):
        entry: dict[str, Any] = {k: v for k, v in module._buffers.items() if k.endswith("inv_freq")}
        entry.update({k: v for k, v in vars(module).items() if k.endswith("attention_scaling")})
        state[name] = entry
    return state


def assert_rotary_equal(model: nn.Module, reference: nn.Module) -> None:
    got, want = rotary_state(model), rotary_state(reference)
    assert got.keys() == want.keys()
    for name, entries in want.items():
        assert got[name].keys() == entries.keys(), name
        for key, expected in entries.items():
            actual = got[name][key]
            if isinstance(expected, torch.Tensor):
                assert actual.dtype == torch.float32, f"{name}.{key} is {actual.dtype}"
                assert torch.equal(actual, expected), f"{name}.{key} differs from a fresh model's"
            else:
                assert actual == expected, f"{name}.{key}: {actual} != {expected}"


def mistral3_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """One 64x64 image (16 image tokens after the 2x2 merge) inside 24 text tokens."""
    return mistral3_image_batch(
        mistral3_config(),
        batch=1,
        seq=24,
        image_hw=(64, 64),
        image_start=4,
        seed=seed,
        labels=False,
        attention_mask=False,
    )


# --- detection --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_finds_text_and_vision_rotary(kind: str) -> None:
    cls, make_config, expected = MODELS[kind]
    assert {name for name, _ in find_rotary_modules(fresh(cls, make_config()))} == expected


class _PersistentInvFreq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(4), persistent=True)


class _UnrecoverableArgs(nn.Module):
    """Looks rotary, but ``dim`` is not kept anywhere: nothing to rebuild it from."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(dim // 2), persistent=False)


class _DimThetaRotary(nn.Module):
    """Config-less vision rotary in the style of Qwen3-VL's in transformers <= 5.12."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.register_buffer(
            "inv_freq", 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), False
        )


def test_is_rotary_module_by_what_it_holds() -> None:
    assert not is_rotary_module(nn.Linear(2, 2))
    assert not is_rotary_module(_PersistentInvFreq())
    assert not is_rotary_module(_UnrecoverableArgs(8))
    assert is_rotary_module(_DimThetaRotary(8, theta=100.0))


# --- eager repair -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_repair_after_meta_init_is_bit_identical(kind: str) -> None:
    cls, make_config, expected = MODELS[kind]
    reference = fresh(cls, make_config())
    model = meta_materialized(cls, make_config())
    buffers_before = {n: dict(m._buffers) for n, m in find_rotary_modules(model)}

    assert repair_rotary(model) == len(expected)

    assert_rotary_equal(model, reference)
    for name, module in find_rotary_modules(model):
        for key, tensor in buffers_before[name].items():
            assert module._buffers[key] is tensor, f"{name}.{key} was replaced instead of filled"


def test_repair_restores_nontrivial_attention_scaling() -> None:
    cls = transformers.Mistral3ForConditionalGeneration
    reference = fresh(cls, mistral3_config(YARN_SCALED))
    expected = 0.1 * math.log(16.0) + 1.0
    assert reference.get_submodule(TEXT_ROTARY).attention_scaling == pytest.approx(expected)
    model = meta_materialized(cls, mistral3_config(YARN_SCALED))

    repair_rotary(model)

    assert_rotary_equal(model, reference)


def test_repair_after_bf16_cast_restores_fp32() -> None:
    cls = transformers.Mistral3ForConditionalGeneration
    reference = fresh(cls, mistral3_config())
    model = fresh(cls, mistral3_config()).to(torch.bfloat16)
    assert model.get_submodule(TEXT_ROTARY).inv_freq.dtype == torch.bfloat16

    repair_rotary(model)

    assert_rotary_equal(model, reference)


def test_config_less_rotary_rebuilt_from_its_attributes() -> None:
    reference = _DimThetaRotary(16, theta=321.0)
    module = _DimThetaRotary(16, theta=321.0)
    module.inv_freq.fill_(math.nan)

    recompute_rotary_buffers(module)

    assert torch.equal(module.inv_freq, reference.inv_freq)


def test_recompute_on_meta_buffers_raises() -> None:
    with torch.device("meta"):
        model = transformers.MistralForCausalLM(mistral_config())
    with pytest.raises(RotaryRepairError, match=r"model\.rotary_emb.*MistralRotaryEmbedding.*meta"):
        recompute_rotary_buffers(model.model.rotary_emb, name="model.rotary_emb")


def test_repair_rotary_on_meta_model_defers_to_hooks() -> None:
    cls = transformers.MistralForCausalLM
    reference = fresh(cls, mistral_config())
    with torch.device("meta"):
        model = cls(mistral_config())

    assert repair_rotary(model) == 1

    model.to_empty(device="cpu")
    garble(model)
    model.load_state_dict(reference.state_dict())
    model(input_ids=torch.arange(12).unsqueeze(0))
    assert_rotary_equal(model, reference)


# --- one-shot hooks ---------------------------------------------------------------------------------------


def _count_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return calls


def test_hook_fires_on_language_model_alone_and_removes_itself() -> None:
    cls = transformers.Mistral3ForConditionalGeneration
    reference = fresh(cls, mistral3_config())
    with torch.device("meta"):
        model = cls(mistral3_config())
    rotary = model.get_submodule(TEXT_ROTARY)
    seen: list[torch.Tensor] = []
    # Registered before the repair hook, yet must see repaired buffers.
    user_hook = rotary.register_forward_pre_hook(lambda m, _a: seen.append(m.inv_freq.clone()))
    install_rotary_repair_hooks(model)
    model.to_empty(device="cpu")
    garble(model)
    model.train()
    outer_calls = _count_calls(model)

    model.model.language_model(inputs_embeds=torch.randn(1, 5, 64))

    assert outer_calls == []
    assert torch.equal(rotary.inv_freq, reference.get_submodule(TEXT_ROTARY).inv_freq)
    assert torch.equal(seen[0], rotary.inv_freq), "the repair must run before the user's pre-hooks"
    assert list(rotary._forward_pre_hooks) == [user_hook.id]
    assert rotary.training and model.training
    # The vision rotary has not run yet: still armed, still garbled.
    assert len(model.get_submodule(VISION_ROTARY)._forward_pre_hooks) == 1
    assert model.get_submodule(VISION_ROTARY).inv_freq.isnan().all()

    rotary.inv_freq.fill_(math.nan)
    model.model.language_model(inputs_embeds=torch.randn(1, 5, 64))
    assert rotary.inv_freq.isnan().all(), "the hook must not fire twice"
    assert len(seen) == 2


def test_hook_fires_on_vision_tower_alone() -> None:
    cls = transformers.Mistral3ForConditionalGeneration
    reference = fresh(cls, mistral3_config())
    model = meta_materialized(cls, mistral3_config(), hooks=True)
    model.eval()
    outer_calls = _count_calls(model)
    inputs = mistral3_inputs()

    model.model.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"])

    assert outer_calls == []
    rotary = model.get_submodule(VISION_ROTARY)
    assert torch.equal(rotary.inv_freq, reference.get_submodule(VISION_ROTARY).inv_freq)
    assert torch.equal(rotary.original_inv_freq, reference.get_submodule(VISION_ROTARY).original_inv_freq)
    assert not rotary._forward_pre_hooks
    assert not rotary.training


def test_hook_fires_when_rotary_module_is_called_directly_under_inference_mode() -> None:
    cls = transformers.MistralForCausalLM
    reference = fresh(cls, mistral_config())
    model = meta_materialized(cls, mistral_config(), hooks=True)
    rotary = model.model.rotary_emb
    buffer = rotary.inv_freq

    with torch.inference_mode():
        rotary(torch.zeros(1, 3, 64), torch.arange(3).unsqueeze(0))

    assert rotary.inv_freq is buffer and not buffer.is_inference()
    assert_rotary_equal(model, reference)


def test_hook_stays_armed_through_a_meta_forward() -> None:
    with torch.device("meta"):
        model = transformers.MistralForCausalLM(mistral_config())
    install_rotary_repair_hooks(model)
    model.model.rotary_emb(torch.zeros(1, 3, 64, device="meta"), torch.arange(3, device="meta").unsqueeze(0))
    assert len(model.model.rotary_emb._forward_pre_hooks) == 1


def test_install_is_idempotent() -> None:
    with torch.device("meta"):
        model = transformers.Mistral3ForConditionalGeneration(mistral3_config())

    assert install_rotary_repair_hooks(model) == 2
    assert install_rotary_repair_hooks(model) == 2
    assert repair_rotary(model) == 2

    for _, module in find_rotary_modules(model):
        assert len(module._forward_pre_hooks) == 1


def test_hook_works_on_a_deepcopy() -> None:
    cls = transformers.MistralForCausalLM
    reference = fresh(cls, mistral_config())
    original = meta_materialized(cls, mistral_config(), hooks=True)
    clone = copy.deepcopy(original)

    clone.model.rotary_emb(torch.zeros(1, 3, 64), torch.arange(3).unsqueeze(0))

    assert_rotary_equal(clone, reference)
    assert not clone.model.rotary_emb._forward_pre_hooks
    assert len(original.model.rotary_emb._forward_pre_hooks) == 1


# --- end to end: the silent wrong loss --------------------------------------------------------------------


def _meta_loaded(reference: nn.Module, *, hooks: bool) -> nn.Module:
    with torch.device("meta"):
        model = type(reference)(reference.config)
    if hooks:
        install_rotary_repair_hooks(model)
    model.to_empty(device="cpu")
    garble(model, 0.5)  # finite garbage: the model runs and nothing looks wrong
    model.load_state_dict(reference.state_dict())
    model.tie_weights()
    return model.eval()


def test_full_forward_logits_match_a_fresh_model_only_with_the_repair() -> None:
    reference = fresh(transformers.Mistral3ForConditionalGeneration, mistral3_config(YARN_SCALED)).eval()
    inputs = mistral3_inputs()
    with torch.no_grad():
        want = reference(**inputs).logits
        repaired = _meta_loaded(reference, hooks=True)(**inputs).logits
        broken = _meta_loaded(reference, hooks=False)(**inputs).logits

    assert torch.equal(repaired, want)
    assert torch.isfinite(broken).all()
    assert not torch.allclose(broken, want, atol=1e-3)


# --- modules that cannot be recomputed --------------------------------------------------------------------


class _ConfigRotary(nn.Module):
    """A config-driven rotary in the transformers 5.x shape."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.rope_type = "default"
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_freq.sum()


class _Holder(nn.Module):
    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotary(x)


def _broken_holder() -> _Holder:
    holder = _Holder(_ConfigRotary(transformers.PreTrainedConfig(head_dim=8, rope_theta=100.0)))
    holder.rotary.config = transformers.PreTrainedConfig(rope_theta=100.0)  # head_dim lost
    holder.rotary.inv_freq.fill_(math.nan)
    return holder


def test_broken_config_raises_from_recompute() -> None:
    holder = _broken_holder()
    assert find_rotary_modules(holder) == [("rotary", holder.rotary)]
    with pytest.raises(RotaryRepairError, match=r"'rotary'.*_ConfigRotary.*head_dim"):
        recompute_rotary_buffers(holder.rotary, name="rotary")
    with pytest.raises(RotaryRepairError, match=r"'rotary'.*_ConfigRotary"):
        repair_rotary(holder)


def test_broken_config_raises_from_the_hook_at_forward_time() -> None:
    holder = _broken_holder()
    assert install_rotary_repair_hooks(holder) == 1
    with pytest.raises(RotaryRepairError, match=r"'rotary'.*_ConfigRotary"):
        holder(torch.ones(2))
    assert len(holder.rotary._forward_pre_hooks) == 1, "a failed repair must stay armed"


def test_custom_config_rotary_repairs_when_config_is_sound() -> None:
    rotary = _ConfigRotary(transformers.PreTrainedConfig(head_dim=8, rope_theta=100.0))
    expected = rotary.inv_freq.clone()
    rotary.inv_freq.fill_(math.nan)
    rotary.attention_scaling = 7.0

    recompute_rotary_buffers(rotary)

    assert torch.equal(rotary.inv_freq, expected) and rotary.attention_scaling == 1.0


# --- FSDP2: shard on meta, to_empty, load, first forward --------------------------------------------------

_FSDP_SCRIPT = """
import gc, os, sys
import torch, torch.distributed as dist, transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from automodel_plugins.model.rotary import install_rotary_repair_hooks
from automodel_plugins.testing.tiny_models import TINY_TEXT_SIZES

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
config = transformers.MistralConfig(**TINY_TEXT_SIZES, tie_word_embeddings=False)
torch.manual_seed(0)
reference = transformers.MistralForCausalLM(config)
with torch.device("meta"):
    model = transformers.MistralForCausalLM(config)
assert install_rotary_repair_hooks(model) == 1
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
model.to_empty(device="cpu")
model.model.rotary_emb.inv_freq.fill_(0.5)
set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
ids = torch.arange(10).unsqueeze(0)
with torch.no_grad():
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
print("rank", dist.get_rank(), "OK", flush=True)
# The teardown of tests/distributed/_worker.py: left to the interpreter's finalization, gloo's run-loop threads
# abort a launch now and then ("terminate called without an active exception") after every rank printed OK.
del model, mesh
gc.collect()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.distributed
def test_fsdp2_meta_init_then_to_empty_is_repaired_by_the_hooks(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_rotary.py"
    script.write_text(_FSDP_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("OK") == 2
