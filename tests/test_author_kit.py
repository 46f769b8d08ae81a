"""The plugin author's kit: ``testing.compare`` must pass a correct plugin and catch each way a plugin can be
wrong (a weight, a rotary table, the logits); its reference dequantization is checked on hand-made numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from automodel_plugins import Claim, hookimpl
from automodel_plugins.registry import Registry, get_registry
from automodel_plugins.testing.compare import (
    assert_matches_stock,
    reference_dequantized_state_dict,
    stock_reads_exactly,
)
from automodel_plugins.testing.tiny_models import tiny_llama_config

Tamper = Callable[[Any], None]


class LlamaFp8Plugin:
    """A throwaway plugin for stock Llama FP8 checkpoints; ``tamper`` breaks it after the load."""

    def __init__(self, tamper: Tamper | None = None, forward_offset: float = 0.0) -> None:
        self.tamper = tamper
        self.forward_offset = forward_offset

    @hookimpl
    def claim_config(self, config: Any) -> Claim | None:
        return Claim(reason="llama") if config.model_type == "llama" else None

    @hookimpl
    def state_dict_adapter(self, config: Any, checkpoint: Any) -> Any:
        from automodel_plugins.adapters import fp8_adapter_for

        return fp8_adapter_for(config, checkpoint)

    @hookimpl
    def post_materialize(self, model: Any, config: Any) -> None:
        from automodel_plugins.model.rotary import repair_rotary

        repair_rotary(model)
        if self.tamper is not None and not model.model.rotary_emb.inv_freq.is_meta:
            self.tamper(model)

    @hookimpl
    def forward_override(self, model: Any, config: Any) -> Any:
        if not self.forward_offset:
            return None
        stock, offset = type(model).forward, self.forward_offset

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = stock(self, *args, **kwargs)
            out.logits = out.logits + offset
            return out

        return forward


@pytest.fixture(scope="module")
def llama_checkpoints(fp8_checkpoint_factory: Any) -> dict[str, Path]:
    """A tiny Llama (intermediate 200) in 32x32 blocks (partial edges) and in 8x8 blocks (whole blocks)."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=64,
        intermediate_size=200,
        num_hidden_layers=1,
        head_dim=16,
        vocab_size=128,
        architectures=None,
    )
    model = LlamaForCausalLM(config).eval()
    return {
        str(block): fp8_checkpoint_factory(model, name=f"llama{block}", block_size=(block, block))
        for block in (32, 8)
    }


@pytest.fixture
def register(isolated_registry: Registry) -> Callable[..., Registry]:
    def add(plugin: LlamaFp8Plugin) -> Registry:
        isolated_registry.register(plugin, name="llama_fp8")
        return isolated_registry

    return add


INPUTS = {"input_ids": torch.arange(2, 14).reshape(2, 6)}


# --- assert_matches_stock ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("block", "against"), [("32", "reference"), ("8", "stock")])
def test_a_correct_plugin_passes(
    llama_checkpoints: dict[str, Path], register: Any, block: str, against: str
) -> None:
    register(LlamaFp8Plugin())
    comparison = assert_matches_stock(llama_checkpoints[block], inputs=INPUTS, plugin="llama_fp8")
    assert comparison.against == against


def test_a_wrong_weight_is_caught(llama_checkpoints: dict[str, Path], register: Any) -> None:
    def nudge(model: Any) -> None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 1

    register(LlamaFp8Plugin(tamper=nudge))
    with pytest.raises(AssertionError, match=r"1 tensor\(s\) differ: model.layers.0.mlp.down_proj.weight"):
        assert_matches_stock(llama_checkpoints["32"])


def test_a_wrong_rotary_table_is_caught(llama_checkpoints: dict[str, Path], register: Any) -> None:
    """Rotary buffers are not in the state dict: only the rotary comparison sees them."""
    register(LlamaFp8Plugin(tamper=lambda model: model.model.rotary_emb.inv_freq.mul_(2)))
    with pytest.raises(AssertionError, match=r"rotary buffer model\.rotary_emb\.inv_freq"):
        assert_matches_stock(llama_checkpoints["8"])


def test_wrong_logits_are_caught(llama_checkpoints: dict[str, Path], register: Any) -> None:
    register(LlamaFp8Plugin(forward_offset=1e-2))
    assert_matches_stock(llama_checkpoints["8"])  # weights and rotary are right
    with pytest.raises(AssertionError, match=r"logits: .* element"):
        assert_matches_stock(llama_checkpoints["8"], inputs=INPUTS)


def test_the_composing_plugin_is_checked(llama_checkpoints: dict[str, Path], register: Any) -> None:
    register(LlamaFp8Plugin())
    with pytest.raises(AssertionError, match="composed by 'llama_fp8', expected plugin 'other'"):
        assert_matches_stock(llama_checkpoints["8"], plugin="other")


# --- the reference dequantization -------------------------------------------------------------------------


def write(directory: Path, tensors: dict[str, torch.Tensor], block: list[int] | None) -> Path:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_reference_expands_partial_edge_blocks(tmp_path: Path) -> None:
    """A 3x5 weight of ones in 2x2 blocks: grid 2x3, the last row and column are partial blocks."""
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tensors = {
        "w.weight": torch.ones(3, 5).to(torch.float8_e4m3fn),
        "w.weight_scale_inv": grid,
        "w.input_scale": torch.tensor(1.0),
        "norm.weight": torch.full((5,), 0.5),
    }
    state = reference_dequantized_state_dict(write(tmp_path / "ck", tensors, [2, 2]), dtype=torch.float32)
    expected = torch.tensor([[1, 1, 2, 2, 3], [1, 1, 2, 2, 3], [4, 4, 5, 5, 6]], dtype=torch.float32)
    assert sorted(state) == ["norm.weight", "w.weight"]
    assert torch.equal(state["w.weight"], expected)
    assert state["norm.weight"].dtype == torch.float32


def test_reference_per_tensor_and_e8m0_scales(tmp_path: Path) -> None:
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    per_tensor = write(tmp_path / "pt", {"a.weight": weight, "a.weight_scale": torch.tensor(0.25)}, None)
    assert torch.equal(
        reference_dequantized_state_dict(per_tensor, dtype=torch.float32)["a.weight"],
        torch.tensor([[0.25, -0.5], [0.125, 1.0]]),
    )
    e8m0 = write(
        tmp_path / "e8", {"a.weight": weight, "a.weight_scale_inv": torch.tensor([[129]]).byte()}, [2, 2]
    )
    assert torch.equal(reference_dequantized_state_dict(e8m0)["a.weight"], (weight.float() * 4).bfloat16())


@pytest.mark.parametrize(
    ("shape", "block", "exact"),
    [
        ((200, 64), [128, 128], False),
        ((100, 64), [128, 128], True),
        ((256, 64), [128, 128], True),
        ((64, 200), [32, 8], True),
        ((64, 200), [32, 32], False),
    ],
)
def test_stock_reads_exactly(tmp_path: Path, shape: tuple[int, int], block: list[int], exact: bool) -> None:
    tensors = {"w.weight": torch.zeros(shape).to(torch.float8_e4m3fn)}
    assert stock_reads_exactly(write(tmp_path / "ck", tensors, block)) is exact


# --- fixtures ---------------------------------------------------------------------------------------------


def test_fp8_checkpoint_factory_writes_fresh_directories(llama_checkpoints: dict[str, Path]) -> None:
    first, second = llama_checkpoints["32"], llama_checkpoints["8"]
    assert first != second
    assert json.loads((first / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        32,
        32,
    ]


def test_plugin_registry_installs_only_the_named_plugins(
    plugin_registry: Any, fake_distribution: Any
) -> None:
    source = (
        "from automodel_plugins import hookimpl\n\n@hookimpl\ndef claim_config(config):\n    return None\n"
    )
    for name in ("kit_a", "kit_b"):
        fake_distribution(
            f"kit-{name}", entry_points={name: f"{name}_plugin"}, modules={f"{name}_plugin": source}
        )
    registry = plugin_registry("kit_b")
    assert get_registry() is registry
    assert [(r.name, r.distribution, r.status) for r in registry.plugins()] == [
        ("kit_b", "kit-kit_b", "loaded")
    ]


def test_fixture_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, automodel_plugins.testing.pytest_plugin; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
