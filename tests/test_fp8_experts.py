"""``Fp8Experts`` on its own, against stock transformers: ``Qwen3VLMoeTextExperts`` run eagerly, holding the
expert weights dequantized by the plain formula written here, with torch's own autograd."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from automodel_plugins.errors import FrozenFp8WeightError, ScaleError
from automodel_plugins.fp8 import quantize
from automodel_plugins.model.fp8_experts import Fp8Experts, fused_experts_shapes
from automodel_plugins.model.fp8_resident import Fp8Codes
from automodel_plugins.testing.residency import watch_weight_copies
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

E4M3, BF16, F32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
CASES = [  # (experts, hidden, intermediate, block): whole blocks; partial edge blocks on every axis
    (4, 48, 32, (16, 16)),
    (3, 40, 20, (16, 16)),
]
TOKENS, TOP_K = 7, 2  # an odd token count: no activation shares an expert matrix's shape


def reference_matrix(codes: torch.Tensor, scale: torch.Tensor, block, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = codes.shape
    expanded = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (codes.float() * expanded).to(dtype)


def stock_experts(experts: int, hidden: int, intermediate: int) -> torch.nn.Module:
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = tiny_qwen3_vl_moe_config().text_config
    config.num_experts, config.hidden_size, config.moe_intermediate_size = experts, hidden, intermediate
    config._experts_implementation = "eager"
    return Qwen3VLMoeTextExperts(config)


def tiny_mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=48, intermediate_size=32, num_local_experts=4, num_hidden_layers=1)


def make_pair(experts: int, hidden: int, intermediate: int, block, dtype=F32, seed=0):
    """An ``Fp8Experts`` holding quantized random experts, and stock eager experts holding them dequantized."""
    g = torch.Generator().manual_seed(seed)
    stock = stock_experts(experts, hidden, intermediate).to(dtype)
    resident = Fp8Experts.replacing(stock, block_size=block, fp8_dtype=E4M3, device="cpu")
    for name, (count, rows, cols) in resident.shapes.items():
        pairs = [quantize(torch.randn(rows, cols, generator=g) * 0.1, block_size=block) for _ in range(count)]
        codes, scales = torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])
        resident.load_fp8(name, codes, scales)
        dense = torch.stack([reference_matrix(c, s, block, dtype) for c, s in pairs])
        setattr(stock, name, torch.nn.Parameter(dense, requires_grad=False))
    return resident, stock


def routing(hidden: int, experts: int, dtype=F32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, hidden, generator=g).to(dtype)
    logits = torch.randn(TOKENS, experts, generator=g)
    weights, index = torch.topk(logits.softmax(-1), TOP_K, dim=-1)
    return x, index, weights.to(dtype)


@pytest.mark.parametrize(("experts", "hidden", "intermediate", "block"), CASES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_forward_and_input_gradients_are_bit_identical_to_stock_eager(
    experts: int, hidden: int, intermediate: int, block, dtype: torch.dtype
) -> None:
    resident, stock = make_pair(experts, hidden, intermediate, block, dtype)
    x, index, weights = routing(hidden, experts, dtype)
    results = []
    for module in (resident, stock):
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = module(xi, index, wi)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out, xi.grad, wi.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_an_expert_no_token_picks_is_skipped_and_its_output_rows_stay_zero() -> None:
    resident, stock = make_pair(4, 48, 32, (16, 16))
    x, _, weights = routing(48, 4)
    index = torch.zeros(TOKENS, TOP_K, dtype=torch.long)
    index[:, 1] = 2  # experts 1 and 3 unused
    torch.testing.assert_close(resident(x, index, weights), stock(x, index, weights), atol=0, rtol=0)


def test_autograd_saves_codes_and_no_dequantized_expert_outlives_its_use() -> None:
    resident, _ = make_pair(4, 96, 64, (32, 32))  # matrices big enough for the one-allocation CPU dequant
    x, index, weights = routing(96, 4)
    x.requires_grad_(True)
    with watch_weight_copies(resident) as watch:
        out = resident(x, index, weights)
        assert watch.alive() == 0
        out.sum().backward()
    hit = len(index.unique())
    assert watch.created == 4 * hit  # gate_up and down, each dequantized in the forward and in the backward
    assert watch.peak_alive == 1 and watch.alive_after_layers == [0]
    assert watch.saved_copies == [] and any(dtype == torch.uint8 for _, dtype in watch.saved)
    assert resident.gate_up_proj.grad is None and resident.down_proj.grad is None


def test_codes_are_frozen() -> None:
    resident, _ = make_pair(4, 48, 32, (16, 16))
    assert isinstance(resident.gate_up_proj, Fp8Codes) and isinstance(resident.down_proj, Fp8Codes)
    with pytest.raises(FrozenFp8WeightError):
        resident.requires_grad_(True)
    with pytest.raises(FrozenFp8WeightError):
        resident.down_proj.requires_grad = True


def test_state_dict_shows_fp8_and_round_trips() -> None:
    resident, _ = make_pair(4, 48, 32, (16, 16))
    state = resident.state_dict()
    assert state["gate_up_proj"].dtype == E4M3 and state["down_proj"].dtype == E4M3
    assert state["gate_up_proj_scale_inv"].shape == (4, 4, 3) and state["down_proj_scale_inv"].shape == (
        4,
        3,
        2,
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    other, _ = make_pair(4, 48, 32, (16, 16), seed=5)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(other.codes(name).view(torch.uint8), resident.codes(name).view(torch.uint8))
        assert torch.equal(other.scale(name), resident.scale(name))
    assert isinstance(other.gate_up_proj, Fp8Codes)
    with pytest.raises(ScaleError, match="one block grid"):
        other.load_fp8("down_proj", resident.codes("down_proj"), torch.ones(4, 2, 2))


def test_dtype_casts_change_the_compute_dtype_not_the_codes_or_scales() -> None:
    resident, _ = make_pair(4, 48, 32, (16, 16))
    codes, scale = resident.gate_up_proj.clone(), resident.gate_up_proj_scale_inv.clone()
    resident.to(BF16)
    assert resident.compute_dtype == BF16
    assert torch.equal(resident.gate_up_proj, codes) and isinstance(resident.gate_up_proj, Fp8Codes)
    assert resident.gate_up_proj_scale_inv.dtype == F32 and torch.equal(
        resident.gate_up_proj_scale_inv, scale
    )
    x, index, weights = routing(48, 4, BF16)
    assert resident(x, index, weights).dtype == BF16
    copied = copy.deepcopy(resident)
    assert torch.equal(copied.down_proj, resident.down_proj)
    with pytest.raises(TypeError, match="FP8 codes"):
        resident.type(torch.float16)


def test_dequantized_equals_the_reference_and_only_fused_experts_are_replaced() -> None:
    resident, stock = make_pair(3, 40, 20, (16, 16))
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(resident.dequantized(name), getattr(stock, name), atol=0, rtol=0)
    assert fused_experts_shapes(stock) == {"gate_up_proj": (3, 40, 40), "down_proj": (3, 40, 20)}
    assert fused_experts_shapes(resident) is None and fused_experts_shapes(torch.nn.Linear(2, 2)) is None
    stock.is_transposed = True
    with pytest.raises(TypeError, match="not a fused experts module"):
        Fp8Experts.replacing(stock, block_size=(16, 16), fp8_dtype=E4M3)


def test_experts_whose_forward_differs_from_the_stock_loop_are_not_replaced() -> None:
    """Same parameters and flags, another forward (here: its input doubled, then the stock loop): not
    the loop ``Fp8Experts`` reproduces, so it is left alone (its tensors are dequantized at load)."""
    stock = stock_experts(4, 48, 32)

    class Reweighted(type(stock)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states * 2, top_k_index, top_k_weights)

    stock.__class__ = Reweighted
    assert fused_experts_shapes(stock) is None
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    assert fused_experts_shapes(MixtralExperts(tiny_mixtral_config())) is not None  # the same loop, copied
