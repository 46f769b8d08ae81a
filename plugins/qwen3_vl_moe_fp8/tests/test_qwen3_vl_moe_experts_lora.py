"""PEFT LoRA on the FP8-resident experts themselves: the ``LoraConfig`` one writes for the dequantized stock model
(``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` beside attention ``target_modules``)
on a ``dequantize=False`` model, whose experts are ``Fp8Experts`` holding FP8 codes.

References: the same checkpoint loaded dequantized (``dequantize=True``: the stock class with stock experts, stock
PEFT ``ParamWrapper`` parametrizing the BF16/fp32 tensor), and the stock class holding the hand-dequantized weights
(``moe_checkpoints.reference_model``) with stock PEFT; the same adapter values copied into every model. Merging:
PEFT's own ``merge_and_unload`` on that reference, and stock transformers reading what we save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from moe_checkpoints import (
    EXPERTS,
    GRID_THW,
    LAYERS,
    PLUGIN,
    reference_model,
    stored_tensors,
    tiny_config,
)
from torch.nn import functional as F
from torch.nn.utils import parametrize

import automodel_plugins
from automodel_plugins.errors import FrozenFp8WeightError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_experts_lora import Fp8ExpertsParamWrapper
from automodel_plugins.testing.residency import watch_weight_copies
from automodel_plugins.testing.stock_conversions import stock_per_expert_conversion
from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch

ALIGNED = (8, 8)
F32, BF16 = torch.float32, torch.bfloat16
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERTS_PREFIX = "model.language_model.layers.{layer}.mlp.experts"
E4M3_MAX = 448.0


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def lora_config(**overrides: Any) -> peft.LoraConfig:
    options: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": EXPERT_TARGETS,
        "init_lora_weights": False,
    }
    return peft.LoraConfig(**{**options, **overrides})


def adapted(model: Any, adapters: dict[str, torch.Tensor] | None = None, **overrides: Any) -> Any:
    """``get_peft_model`` with :func:`lora_config`; ``adapters``: values to copy into the LoRA tensors by name."""
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora_config(**overrides))
    if adapters is not None:
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert sorted(lora) == sorted(adapters)
        with torch.no_grad():
            for name, param in lora.items():
                param.copy_(adapters[name])
    return model


def adapter_values(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def experts_of(model: Any, layer: int) -> Any:
    return model.get_submodule(EXPERTS_PREFIX.format(layer=layer))


def fp8_experts(model: Any) -> list[Fp8Experts]:
    return [m for m in model.modules() if isinstance(m, Fp8Experts)]


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def own_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token cross-entropy over the logits, by ``F.cross_entropy`` (the same for every model)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


# --- training: the same numbers as LoRA on the dequantized experts ----------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_loss_logits_and_lora_gradients_equal_lora_on_the_dequantized_model(
    implementation: str, dtype: torch.dtype, moe_checkpoint: Any, image_batch: Any
) -> None:
    """Bit for bit: the same experts values (dequantized the loader's way), the same ``baddbmm`` forming each
    adapted expert, the same kernels; the adapters' gradients through the same ``baddbmm`` backward.
    ``batched_mm`` within rounding: stock's runs matrix-vector products, ours the grouped kernel."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    dequantized = automodel_plugins.from_pretrained(path, dtype=dtype)
    dequantized.set_experts_implementation(implementation)
    want = adapted(dequantized)
    resident = automodel_plugins.from_pretrained(path, dtype=dtype, dequantize=False)
    resident.set_experts_implementation(implementation)
    got = adapted(resident, adapter_values(want))
    assert type(experts_of(got.base_model.model, 0)) is Fp8ExpertsParamWrapper
    assert type(experts_of(want.base_model.model, 0)) is peft.tuners.lora.ParamWrapper
    assert {type(e) for e in fp8_experts(got)} == {Fp8Experts} and not fp8_experts(want)

    results = []
    for model in (got, want):
        out = model(**image_batch)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(), lora_grads(model)))
    (logits, loss, grads), (want_logits, want_loss, want_grads) = results
    if implementation == "batched_mm":
        tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == F32 else {"atol": 2e-2, "rtol": 2e-2}
    else:
        tol = {"atol": 0, "rtol": 0}
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(logits, want_logits, **tol)
    assert sorted(grads) == sorted(want_grads)
    assert len(grads) == LAYERS * (2 + 2) * 2  # q, v and both expert tensors: lora_A and lora_B each
    assert sum(".experts." in name for name in grads) == LAYERS * 2 * 2
    for name, grad in grads.items():
        assert grad.dtype == want_grads[name].dtype, name
        torch.testing.assert_close(grad, want_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert all(bool(grads[n].abs().sum() > 0) for n in grads if "lora_B" in n)


def test_lora_gradients_equal_stock_peft_on_the_hand_dequantized_reference(
    moe_checkpoint: Any, image_batch: Any
) -> None:
    """The independent reference: the stock class holding weights dequantized by the test's own code, stock PEFT,
    the loss by ``F.cross_entropy`` on both."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    want = adapted(reference_model(path, F32))
    got = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), adapter_values(want))
    losses = []
    for model in (got, want):
        loss = own_loss(model, image_batch)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads, want_grads = lora_grads(got), lora_grads(want)
    assert sorted(grads) == sorted(want_grads) and len(grads) == LAYERS * 4 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name


def test_training_moves_the_adapters_and_never_the_codes(moe_checkpoint: Any, image_batch: Any) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    model = adapted(
        automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), init_lora_weights=True
    )
    experts = fp8_experts(model)
    before = [{n: t.clone() for n, t in e.state_dict().items()} for e in experts]
    adapters = adapter_values(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**image_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    for module, state in zip(experts, before, strict=True):
        assert not module.gate_up_proj.requires_grad and module.gate_up_proj.grad is None
        for name, tensor in module.state_dict().items():
            assert tensor.dtype == state[name].dtype and torch.equal(
                tensor.view(torch.uint8), state[name].view(torch.uint8)
            ), name
    moved = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, adapters[n])]
    assert sum(".experts." in n for n in moved) == LAYERS * 2 * 2


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_no_dequantized_expert_stays_alive_or_is_saved_for_backward(
    implementation: str, moe_checkpoint: Any
) -> None:
    """11 tokens, top-2: no activation shares an expert matrix's shape (24, 48, 64)."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    model.set_experts_implementation(implementation)
    model = adapted(model)
    experts = fp8_experts(model)
    batch = qwen3_vl_image_batch(tiny_config(), batch=1, seq=11, grid_thw=GRID_THW)
    with watch_weight_copies(model, experts) as watch:
        model(**batch).loss.backward()
    assert watch.created > 0 and watch.layer_calls == LAYERS
    assert watch.alive_after_layers == [0] * LAYERS and watch.saved_copies == []
    saved = {shape for shape, _ in watch.saved}
    assert (EXPERTS, 48, 4) in saved and (
        EXPERTS,
        4,
        64,
    ) in saved  # the factors: lhs [E, 2I, r], rhs [E, r, H]


def test_a_stock_parametrization_of_the_codes_is_still_refused(
    moe_checkpoint: Any, image_inputs: Any
) -> None:
    """What the hook prevents: a parametrization of the codes themselves (``W + delta`` on ``uint8``)."""
    model = automodel_plugins.from_pretrained(
        moe_checkpoint(experts="per-expert", block_size=ALIGNED), dtype=F32, dequantize=False
    )

    class AddOne(torch.nn.Module):
        def forward(self, codes: torch.Tensor) -> torch.Tensor:
            return codes + 1

    parametrize.register_parametrization(experts_of(model, 0), "gate_up_proj", AddOne(), unsafe=True)
    with pytest.raises(FrozenFp8WeightError, match="target_parameters"):
        model(**image_inputs)


# --- merging and saving back to FP8 ------------------------------------------------------------------------------


def partly_trained(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``adapters`` with ``lora_B``'s columns of some experts zeroed (what an expert no token reached keeps from
    the zero init): layer 0 expert 1 in both tensors, layer 1 expert 2 in ``down_proj`` only."""
    out = dict(adapters)
    untouched = {(0, "gate_up_proj"): 1, (0, "down_proj"): 1, (1, "down_proj"): 2}
    for (layer, tensor), expert in untouched.items():
        name = next(
            n
            for n in adapters
            if f"layers.{layer}.mlp.experts" in n and "lora_B" in n and _targets(n) == tensor
        )
        b = out[name].clone()
        b.view(b.shape[0], -1, EXPERTS)[:, :, expert] = 0  # PEFT's B: [R, r * E], expert-minor
        out[name] = b
    return out


def _targets(name: str) -> str:
    """Which fused tensor a nested wrapper's adapter belongs to: PEFT nests the second target inside the first."""
    return "gate_up_proj" if ".experts.base_layer.lora_" in name else "down_proj"


def _moved_experts() -> dict[tuple[int, str], set[int]]:
    return {
        (0, "gate_up_proj"): {0, 2, 3},
        (0, "down_proj"): {0, 2, 3},
        (1, "gate_up_proj"): {0, 1, 2, 3},
        (1, "down_proj"): {0, 1, 3},
    }


def test_which_nested_wrapper_holds_which_tensor(moe_checkpoint: Any) -> None:
    """The naming :func:`_targets` relies on, read from the model."""
    model = adapted(
        automodel_plugins.from_pretrained(
            moe_checkpoint(experts="per-expert", block_size=ALIGNED), dtype=F32, dequantize=False
        )
    )
    outer = experts_of(model.base_model.model, 0)
    assert outer.parameter_name == "down_proj" and outer.base_layer.parameter_name == "gate_up_proj"
    assert type(outer.base_layer) is Fp8ExpertsParamWrapper


def stock_merged(path: Path, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's own merge on the hand-dequantized stock reference (fp32): every expert tensor, merged."""
    merged = adapted(reference_model(path, F32), adapters).merge_and_unload()
    return {
        (layer, tensor): getattr(experts_of(merged, layer), tensor).detach()
        for layer in range(LAYERS)
        for tensor in ("gate_up_proj", "down_proj")
    }


def per_expert_file_keys(layer: int, tensor: str, expert: int) -> list[str]:
    prefix = f"{EXPERTS_PREFIX.format(layer=layer)}.{expert}"
    pieces = ("gate_proj", "up_proj") if tensor == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{p}.{suffix}" for p in pieces for suffix in ("weight", "weight_scale_inv")]


def within_one_fp8_step(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``|got - want|`` against one e4m3 step at ``want`` (a relative 2^-3 for normals; ``2^-9`` units of the
    block scale for subnormals), ``scale`` the fp32 block grid: the largest violation (<= 0 passes)."""
    rows, cols = want.shape
    cell = scale.repeat_interleave(ALIGNED[0], 0)[:rows].repeat_interleave(ALIGNED[1], 1)[:, :cols]
    step = torch.maximum(want.abs() / 8, cell * 2.0**-9)
    return ((got - want).abs() - step).max()


def test_merge_lora_re_quantizes_only_the_moved_experts_and_stock_reads_the_merge(
    moe_checkpoint: Any, tmp_path: Path, image_batch: Any
) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    model = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False))
    adapters = partly_trained(adapter_values(model))
    model = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), adapters)
    merged = automodel_plugins.merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert len(fp8_experts(merged)) == LAYERS
    assert merged.config.quantization_config["quant_method"] == "fp8"
    automodel_plugins.save_pretrained(merged, tmp_path / "merged")

    source, saved = stored_tensors(path), stored_tensors(tmp_path / "merged")
    want = stock_merged(path, adapters)
    with stock_per_expert_conversion():
        from transformers import Qwen3VLMoeForConditionalGeneration

        stock = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=F32)
    for (layer, tensor), moved in _moved_experts().items():
        read = getattr(experts_of(stock, layer), tensor).detach()
        for expert in range(EXPERTS):
            keys = per_expert_file_keys(layer, tensor, expert)
            same = [torch.equal(saved[k].view(torch.uint8), source[k].view(torch.uint8)) for k in keys]
            scale = torch.cat([saved[k] for k in keys if k.endswith("scale_inv")]).float()
            if expert not in moved:
                assert all(same), (layer, tensor, expert)
                assert torch.equal(read[expert], want[layer, tensor][expert])  # the delta is zero
                continue
            assert not all(same), (layer, tensor, expert)
            merged_values = want[layer, tensor][expert]
            fresh = _block_amax(merged_values) / E4M3_MAX
            torch.testing.assert_close(scale, fresh, rtol=1e-6, atol=0)
            assert within_one_fp8_step(read[expert], merged_values, scale) <= 0, (layer, tensor, expert)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]


def _block_amax(values: torch.Tensor) -> torch.Tensor:
    rows, cols = values.shape
    bm, bn = ALIGNED
    blocks = values.abs().reshape(rows // bm, bm, cols // bn, bn)
    return blocks.amax(dim=(1, 3))


def test_peft_merge_and_unload_equals_merge_lora_and_unmerge_restores_the_codes(
    moe_checkpoint: Any, image_inputs: Any
) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    first = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False))
    adapters = partly_trained(adapter_values(first))
    with torch.no_grad():
        adapted_logits = first(**image_inputs).logits
    codes = [{n: t.clone() for n, t in e.state_dict().items()} for e in fp8_experts(first)]

    first.merge_adapter()
    with torch.no_grad():
        merged_logits = first(**image_inputs).logits
    assert not all(torch.equal(t, codes[0][n]) for n, t in fp8_experts(first)[0].state_dict().items())
    torch.testing.assert_close(
        merged_logits, adapted_logits, atol=0.05, rtol=0.05
    )  # FP8 rounding of the merge
    first.unmerge_adapter()
    for module, state in zip(fp8_experts(first), codes, strict=True):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor.view(torch.uint8), state[name].view(torch.uint8)), name
    with torch.no_grad():
        assert torch.equal(first(**image_inputs).logits, adapted_logits)

    peft_merged = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), adapters)
    peft_merged = peft_merged.merge_and_unload()
    ours = automodel_plugins.merge_lora(
        adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), adapters)
    )
    for a, b in zip(fp8_experts(peft_merged), fp8_experts(ours), strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


# --- the adapter as a file, and gradient checkpointing ------------------------------------------------------------


def test_the_saved_adapter_loads_into_the_stock_model_and_back(
    moe_checkpoint: Any, tmp_path: Path, image_inputs: Any
) -> None:
    """``save_pretrained`` writes the keys stock PEFT writes for the stock model: the adapter trained on the
    resident experts loads into the dequantized model (and into a resident one) and gives the same logits."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    resident = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False))
    resident.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = resident(**image_inputs).logits
    stock = peft.PeftModel.from_pretrained(
        automodel_plugins.from_pretrained(path, dtype=F32), tmp_path / "adapter"
    )
    again = peft.PeftModel.from_pretrained(
        automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), tmp_path / "adapter"
    )
    assert type(experts_of(again.base_model.model, 1)) is Fp8ExpertsParamWrapper
    with torch.no_grad():
        assert torch.equal(stock(**image_inputs).logits, want)
        assert torch.equal(again(**image_inputs).logits, want)


def test_gradient_checkpointing_gives_the_same_expert_lora_gradients(
    moe_checkpoint: Any, image_batch: Any
) -> None:
    """The recomputed forward attaches the deltas again (the wrapper's forward runs again)."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    results = []
    for checkpointing in (False, True):
        model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
        if checkpointing:
            model.activation_checkpointing_enable()
        model = adapted(model).train()
        assert model.base_model.model.model.language_model.gradient_checkpointing == checkpointing
        model(**image_batch).loss.backward()
        results.append(lora_grads(model))
    plain, checkpointed = results
    assert sorted(plain) == sorted(checkpointed) and sum(".experts." in n for n in plain) == LAYERS * 4
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name


def test_one_expert_per_run_gives_the_same_loss_and_gradients(
    moe_checkpoint: Any, image_batch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dequantization budget below one expert matrix: every run is one expert (forward and backward), as a
    large model's layer is split into runs; the numbers do not depend on it."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    results = []
    for budget in (Fp8Experts.dequant_budget_bytes, 1):
        monkeypatch.setattr(Fp8Experts, "dequant_budget_bytes", budget)
        model = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False))
        loss = model(**image_batch).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (loss, grads), (one_loss, one_grads) = results
    assert torch.equal(loss, one_loss) and sorted(grads) == sorted(one_grads)
    for name, grad in grads.items():
        assert torch.equal(grad, one_grads[name]), name
