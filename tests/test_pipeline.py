"""The load pipeline with fake plugins on a tiny Llama: claim resolution, hook failures, buffer poisoning,
the stock fallback, and ``build_model`` + ``load_weights``. Every registry here is isolated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from automodel_plugins import (
    AmbiguousClaimError,
    Claim,
    ConfigError,
    NoPluginClaimError,
    PluginError,
    build_model,
    from_pretrained,
    hookimpl,
    load_weights,
)
from automodel_plugins.adapters import Fp8StateDictAdapter
from automodel_plugins.model.rotary import repair_rotary
from automodel_plugins.pipeline.load.load import resolve_dtype
from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_state_dict
from automodel_plugins.testing.tiny_models import tiny_llama_config

ROTARY = "model.rotary_emb"

# --- a tiny Llama and its checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def fp8_path(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-tensor FP8 text Linears, BF16 head, runtime key names, two shards."""
    return write_fp8_checkpoint(
        llama, tmp_path_factory.mktemp("llama_fp8"), modules_to_not_convert=("lm_head",), shards=2
    )


@pytest.fixture(scope="module")
def bf16_path(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama_bf16")
    copy.deepcopy(llama).to(torch.bfloat16).save_pretrained(directory)
    return directory


def stock(path: Path, **kwargs: Any) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, **kwargs).eval()


def assert_rotary_fresh(model: torch.nn.Module) -> None:
    fresh = LlamaForCausalLM(tiny_llama_config()).get_submodule(ROTARY)
    rotary = model.get_submodule(ROTARY)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, fresh.inv_freq)
    assert rotary.attention_scaling == fresh.attention_scaling


# --- fake plugins -----------------------------------------------------------------------------------------


class LlamaPlugin:
    """Claims Llama configs; repairs rotary buffers unless told not to; can raise in a chosen hook."""

    def __init__(
        self, *, priority: int = 0, repair: bool = True, raise_in: str | None = None, **returns: Any
    ):
        self.priority, self.repair, self.raise_in, self.returns = priority, repair, raise_in, returns
        self.calls: list[tuple[str, bool]] = []

    def _maybe_raise(self, hook: str) -> None:
        if self.raise_in == hook:
            raise RuntimeError(f"boom in {hook}")

    @hookimpl
    def claim_config(self, config: Any) -> Claim | None:
        self._maybe_raise("claim_config")
        return Claim(reason="a llama", priority=self.priority) if config.model_type == "llama" else None

    @hookimpl
    def state_dict_adapter(self, config: Any, checkpoint: Any) -> Any:
        self._maybe_raise("state_dict_adapter")
        return self.returns.get("adapter", Fp8StateDictAdapter(checkpoint))

    @hookimpl
    def post_materialize(self, model: Any, config: Any) -> None:
        self._maybe_raise("post_materialize")
        self.calls.append(("post_materialize", model.get_submodule(ROTARY).inv_freq.is_meta))
        if self.repair:
            repair_rotary(model)

    @hookimpl
    def forward_override(self, model: Any, config: Any) -> Any:
        self._maybe_raise("forward_override")
        return self.returns.get("forward")


def registry_with(**plugins: Any) -> Registry:
    registry = Registry()
    for name, plugin in plugins.items():
        record = registry.register(plugin, name=name)
        assert record.status == "loaded", record.error
    return registry


# --- the plugin path --------------------------------------------------------------------------------------


def test_claimed_fp8_load_equals_stock(fp8_path: Path) -> None:
    plugin = LlamaPlugin()
    model = from_pretrained(fp8_path, registry=registry_with(fake_llama=plugin))
    assert type(model) is LlamaForCausalLM and not model.training
    assert_same_state_dict(model, stock(fp8_path))
    assert_rotary_fresh(model)
    composition = model.automodel_composition
    assert (composition.plugin, composition.claim_reason, composition.dequantized_from) == (
        "fake_llama",
        "a llama",
        "fp8",
    )
    assert composition.load.dequantized == 7 * 2 and composition.load.tensors == len(model.state_dict())
    assert getattr(model.config, "quantization_config", None) is None
    assert plugin.calls == [("post_materialize", False)]
    assert not composition.forward_overridden and "forward" not in vars(model)


def test_forward_override_is_bound_on_the_instance(fp8_path: Path) -> None:
    def forward(self: Any, *args: Any, **kwargs: Any) -> str:
        return f"overridden {type(self).__name__}"

    model = from_pretrained(fp8_path, registry=registry_with(fake_llama=LlamaPlugin(forward=forward)))
    assert model.automodel_composition.forward_overridden
    assert model(torch.tensor([[1]])) == "overridden LlamaForCausalLM"
    assert LlamaForCausalLM.forward is not forward and type(model) is LlamaForCausalLM


def test_stock_path_when_no_plugin_claims(bf16_path: Path, isolated_registry: Registry) -> None:
    model = from_pretrained(bf16_path, registry=isolated_registry)
    composition = model.automodel_composition
    assert composition.plugin is None and "stock" in composition.claim_reason
    assert composition.load is None
    assert_same_state_dict(model, stock(bf16_path))


def test_stock_path_also_when_other_plugins_decline(bf16_path: Path) -> None:
    class Declines:
        @hookimpl
        def claim_config(self, config: Any) -> None:
            return None

    model = from_pretrained(bf16_path, registry=registry_with(declines=Declines()))
    assert model.automodel_composition.plugin is None


def test_require_plugin_raises_no_plugin_claim(bf16_path: Path, isolated_registry: Registry) -> None:
    with pytest.raises(NoPluginClaimError, match="llama"):
        from_pretrained(bf16_path, registry=isolated_registry, require_plugin=True)
    with pytest.raises(NoPluginClaimError):
        build_model(bf16_path, registry=isolated_registry, require_plugin=True)


def test_two_claimants_at_the_same_priority_are_ambiguous(
    fp8_path: Path, isolated_registry: Registry
) -> None:
    isolated_registry.register(LlamaPlugin(priority=3), name="first")
    isolated_registry.register(LlamaPlugin(priority=3), name="second")
    with pytest.raises(AmbiguousClaimError) as caught:
        from_pretrained(fp8_path)  # the process default: the isolated registry
    assert caught.value.claimants == ["first", "second"] and caught.value.priority == 3
    assert "'first'" in str(caught.value) and "'second'" in str(caught.value)


def test_higher_priority_wins(fp8_path: Path) -> None:
    registry = registry_with(low=LlamaPlugin(priority=1), high=LlamaPlugin(priority=2))
    assert from_pretrained(fp8_path, registry=registry).automodel_composition.plugin == "high"


@pytest.mark.parametrize(
    "hook", ["claim_config", "state_dict_adapter", "post_materialize", "forward_override"]
)
def test_a_raising_hook_is_a_plugin_error_naming_plugin_and_hook(fp8_path: Path, hook: str) -> None:
    with pytest.raises(PluginError) as caught:
        from_pretrained(fp8_path, registry=registry_with(broken=LlamaPlugin(raise_in=hook)))
    assert (caught.value.plugin, caught.value.hook) == ("broken", hook)
    assert (
        "'broken'" in str(caught.value)
        and hook in str(caught.value)
        and f"boom in {hook}" in str(caught.value)
    )


def test_buffers_nobody_recomputed_are_a_plugin_error(fp8_path: Path) -> None:
    """The host poisons non-persistent buffers with NaN; a plugin that does not restore them is caught."""
    with pytest.raises(PluginError, match="not recomputed") as caught:
        from_pretrained(fp8_path, registry=registry_with(lazy=LlamaPlugin(repair=False)))
    assert (caught.value.plugin, caught.value.hook) == ("lazy", "post_materialize")
    assert f"{ROTARY}.inv_freq" in str(caught.value)


@pytest.mark.parametrize(
    ("returns", "match"),
    [({"adapter": object()}, "not a StateDictAdapter"), ({"forward": 3}, "not callable")],
)
def test_wrong_hook_return_types(fp8_path: Path, returns: dict[str, Any], match: str) -> None:
    with pytest.raises(PluginError, match=match):
        from_pretrained(fp8_path, registry=registry_with(odd=LlamaPlugin(**returns)))


def test_stock_only_options_are_refused_on_the_plugin_path(fp8_path: Path) -> None:
    with pytest.raises(TypeError, match=r"key_mapping.*'fake_llama'"):
        from_pretrained(fp8_path, registry=registry_with(fake_llama=LlamaPlugin()), key_mapping={"a": "b"})


def test_float32_target(fp8_path: Path) -> None:
    model = from_pretrained(fp8_path, registry=registry_with(fake_llama=LlamaPlugin()), dtype=torch.float32)
    assert_same_state_dict(model, stock(fp8_path, dtype=torch.float32))


def test_dtype_resolution() -> None:
    config = tiny_llama_config()
    config.dtype = None
    assert resolve_dtype(config, None) == torch.bfloat16
    config.dtype = "float16"
    assert resolve_dtype(config, None) == torch.float16
    assert resolve_dtype(config, torch.float32) == torch.float32
    with pytest.raises(ConfigError, match="int8"):
        resolve_dtype(config, torch.int8)


# --- build_model + load_weights ---------------------------------------------------------------------------


def test_build_then_load_weights_equals_from_pretrained(fp8_path: Path) -> None:
    plugin = LlamaPlugin()
    registry = registry_with(fake_llama=plugin)
    model = build_model(fp8_path, registry=registry)
    assert all(t.is_meta for t in model.parameters()) and model.automodel_composition.plugin == "fake_llama"
    assert plugin.calls == [("post_materialize", True)]  # once on meta: the plugin arms its hooks
    model.to_empty(device="cpu")
    report = load_weights(model, fp8_path, registry=registry)
    assert plugin.calls[-1] == ("post_materialize", False)
    expected = from_pretrained(fp8_path, registry=registry)
    assert_same_state_dict(model, expected)
    assert_rotary_fresh(model)
    assert report.dequantized == 14 and model.automodel_composition.load is report
    inputs = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model.eval()(inputs).logits, expected(inputs).logits)


def test_load_weights_into_a_meta_model_is_refused(fp8_path: Path) -> None:
    from automodel_plugins import CheckpointError

    registry = registry_with(fake_llama=LlamaPlugin())
    with pytest.raises(CheckpointError, match="to_empty"):
        load_weights(build_model(fp8_path, registry=registry), fp8_path, registry=registry)


def test_build_model_without_a_claim_is_the_bare_stock_class(
    bf16_path: Path, isolated_registry: Registry
) -> None:
    model = build_model(bf16_path, registry=isolated_registry)
    assert type(model) is LlamaForCausalLM and model.automodel_composition.plugin is None
    assert all(t.is_meta for t in model.parameters())
