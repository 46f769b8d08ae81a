"""``Fp8Experts``' grouped path (``experts_implementation`` ``grouped_mm`` / ``batched_mm``) against stock
transformers: ``Qwen3VLMoeTextExperts`` holding the expert weights dequantized by the plain formula of
``test_fp8_experts.py``, run with the same ``experts_implementation``, with torch's own autograd.

What is equal, and why:

* against stock ``grouped_mm``: **bit for bit** here (CPU), forward and both input gradients. Both paths run the
  same ``torch.nn.functional.grouped_mm`` kernel over the same dequantized values and the same rows sorted by
  the same ``torch.sort``; a group's rows are multiplied by its own matrix alone, so passing only the hit experts
  (ours) instead of all of them (stock) changes no product. Where the kernel does not apply (strides not a
  multiple of 16 bytes) ours loops ``torch.mm`` per group and stock's grouped_mm raises; the loop equals the eager
  reference instead.
* against stock ``batched_mm``: within fp32 rounding (``rtol 1e-5, atol 1e-6`` in fp32; one BF16 rounding,
  ``rtol 2**-7``, in BF16): ``batched_mm`` multiplies one matrix by one token vector at a time (``bmm`` of
  matrix-vector products), which sums each dot product in another order than a matrix-matrix kernel.
* against the **eager** reference (stock's loop, and ``Fp8Experts``' own): bit for bit with top-k <= 2, where the
  order of sums is the same: each row's products are the same ``mm`` (grouped_mm's CPU kernel computes a group
  as ``torch.mm`` does), and a token's contributions are summed over its top-k experts, which for two terms is
  one addition whatever the order (eager: ``index_add_`` in expert order; grouped: ``sum`` over the top-k). With
  top-k >= 3 the sums associate differently: within the same rounding tolerance as ``batched_mm``. One more
  condition: hidden and intermediate sizes multiples of 16 (the releases' 2048 / 4096 and 768 / 1536 are). Else
  the CPU BLAS rounds a row differently by its place in a tile, and a group's rows are in ``torch.sort``'s order
  (not stable) rather than eager's token order; and SiLU takes the vector path for an element on one side and
  the scalar tail on the other. Both differ by an ulp (seen at hidden 36 or 40: 4.5e-8 in fp32).
"""

from __future__ import annotations

import pytest
import torch
from test_fp8_experts import make_pair

from automodel_plugins.errors import ConfigError, ExpertsImplementationError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.model import fp8_grouped
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_grouped import ExpertGroups, release_dequant_buffers
from automodel_plugins.testing.residency import watch_weight_copies

BF16, F32 = torch.bfloat16, torch.float32
ALIGNED = (4, 48, 32, (16, 16))  # rows of 32, 48 and 64 elements: 16-byte strides in fp32 and BF16
TOKENS = 7


def pair(implementation: str, case=ALIGNED, dtype=F32, seed=0) -> tuple[Fp8Experts, torch.nn.Module]:
    """Resident experts and stock experts holding them dequantized, sharing one config set to
    ``implementation`` (as the experts of one model share its text config)."""
    resident, stock = make_pair(*case, dtype=dtype, seed=seed)
    assert resident.config is stock.config
    stock.config._experts_implementation = implementation
    return resident, stock


def routing(hidden: int, experts: int, top_k: int, dtype=F32, tokens=TOKENS, seed=1, only=None):
    """Tokens, their top-k experts (among ``only`` when given) and softmax routing weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    if only is not None:
        mask = torch.full((experts,), float("-inf"))
        mask[list(only)] = 0
        logits = logits + mask
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, index, weights.to(dtype)


def run(module: torch.nn.Module, x, index, weights):
    """Output and the gradients of the input and the routing weights, for a fixed non-uniform upstream."""
    xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = module(xi, index, wi)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out, xi.grad, wi.grad


def assert_equal(got, want) -> None:
    for name, a, b in zip(("output", "input grad", "routing grad"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def assert_rounding(got, want, dtype) -> None:
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == F32 else {"atol": 1e-3, "rtol": 2**-7}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_grouped_mm_equals_stock_grouped_mm_bit_for_bit(dtype: torch.dtype, top_k: int) -> None:
    resident, stock = pair("grouped_mm", dtype=dtype)
    x, index, weights = routing(48, 4, top_k, dtype)
    assert_equal(run(resident, x, index, weights), run(stock, x, index, weights))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_batched_mm_equals_stock_batched_mm_within_rounding(dtype: torch.dtype) -> None:
    resident, stock = pair("batched_mm", dtype=dtype)
    x, index, weights = routing(48, 4, 2, dtype)
    assert_rounding(run(resident, x, index, weights), run(stock, x, index, weights), dtype)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_grouped_equals_the_eager_reference_bit_for_bit_at_top_2(
    implementation: str, dtype: torch.dtype
) -> None:
    resident, stock = pair("eager", dtype=dtype)
    x, index, weights = routing(48, 4, 2, dtype)
    want = run(stock, x, index, weights)
    assert_equal(run(resident, x, index, weights), want)  # Fp8Experts' own eager loop
    stock.config._experts_implementation = implementation
    assert_equal(run(resident, x, index, weights), want)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_grouped_is_within_rounding_of_eager_at_top_3(dtype: torch.dtype) -> None:
    resident, stock = pair("eager", dtype=dtype)
    x, index, weights = routing(48, 4, 3, dtype)
    want = run(stock, x, index, weights)
    stock.config._experts_implementation = "grouped_mm"
    assert_rounding(run(resident, x, index, weights), want, dtype)


@pytest.mark.parametrize(
    ("only", "top_k"),
    [((1, 3), 2), ((2,), 1), ((0, 1, 2), 3)],
    ids=["experts-0-and-2-unhit", "one-expert-takes-all", "top-3-of-3-hit"],
)
def test_routing_edge_cases_equal_stock_grouped_mm(only: tuple[int, ...], top_k: int) -> None:
    resident, stock = pair("grouped_mm")
    x, index, weights = routing(48, 4, top_k, only=only)
    assert set(index.unique().tolist()) == set(only)
    assert_equal(run(resident, x, index, weights), run(stock, x, index, weights))


def test_no_tokens_give_an_empty_output_and_gradients() -> None:
    resident, _ = pair("grouped_mm")
    x, index, weights = routing(48, 4, 2, tokens=0)
    got = run(resident, x, index, weights)
    assert got[0].shape == (0, 48) and got[1].shape == (0, 48) and got[2].shape == (0, 2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strides_the_grouped_kernel_refuses_take_the_mm_loop(dtype: torch.dtype, monkeypatch) -> None:
    """hidden 36: in BF16 a token row is 72 bytes, which the CPU grouped_mm kernel refuses (stock's grouped path
    raises there); ours loops ``torch.mm`` per group, as stock's own fallback does (forced here). In fp32 (144
    bytes) the kernel runs on both sides."""
    from transformers.integrations import moe

    case = (3, 36, 32, (16, 16))
    resident, stock = pair("grouped_mm", case=case, dtype=dtype)
    gate_up = torch.empty(3, 64, 36, dtype=dtype)
    fits = fp8_grouped._grouped_mm_fits(torch.empty(5, 36, dtype=dtype), gate_up.transpose(-2, -1))
    assert fits == (dtype == F32)
    if not fits:
        monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)
    x, index, weights = routing(36, 3, 2, dtype)
    assert_equal(run(resident, x, index, weights), run(stock, x, index, weights))


def test_a_dequant_budget_of_one_expert_gives_the_same_bits() -> None:
    """Runs of hit experts (here one at a time, each its own grouped matmul) multiply the same rows by the same
    matrices as one grouped matmul over all of them."""
    resident, stock = pair("grouped_mm")
    x, index, weights = routing(48, 4, 2, tokens=11)
    want = run(stock, x, index, weights)
    resident.dequant_budget_bytes = 1
    assert_equal(run(resident, x, index, weights), want)
    resident.dequant_budget_bytes = 2 * 64 * 48 * 4  # two experts' gate_up per run
    assert_equal(run(resident, x, index, weights), want)


def test_only_hit_experts_are_dequantized_into_one_reused_buffer() -> None:
    release_dequant_buffers()
    first, _ = pair("grouped_mm")
    second, _ = pair("grouped_mm", seed=3)
    x, index, weights = routing(48, 4, 1, only=(0, 3))
    run(first, x, index, weights)
    buffers = fp8_grouped._BUFFERS.by_key
    assert set(buffers) == {(torch.device("cpu"), F32), (torch.device("cpu"), torch.int32)}  # + the indices
    assert (
        buffers[torch.device("cpu"), F32].numel() == 2 * 64 * 48
    )  # the 2 hit experts' gate_up (down: smaller)
    assert buffers[torch.device("cpu"), torch.int32].numel() == 16 * 48  # one block row of indices
    pointers = {key: b.data_ptr() for key, b in buffers.items()}
    run(second, x, index, weights)  # another layer, forward and backward: the same storage
    assert {key: b.data_ptr() for key, b in fp8_grouped._BUFFERS.by_key.items()} == pointers
    release_dequant_buffers()
    assert fp8_grouped._BUFFERS.by_key == {}


def test_autograd_saves_codes_and_routing_never_a_dequantized_expert() -> None:
    resident, _ = pair("grouped_mm", case=(4, 96, 64, (32, 32)))
    x, index, weights = routing(96, 4, 2)
    x.requires_grad_(True)
    with watch_weight_copies(resident) as watch:
        out = resident(x, index, weights)
        assert watch.alive() == 0  # the buffer's views died with the call; nothing holds a copy
        out.sum().backward()
    assert watch.saved_copies == [] and watch.alive_after_layers == [0]
    assert (tuple(resident.gate_up_proj.shape), torch.uint8) in watch.saved
    assert resident.gate_up_proj.grad is None and resident.down_proj.grad is None


def test_the_config_picks_the_forward_at_every_call() -> None:
    resident, stock = pair("grouped_mm", case=(4, 48, 32, (16, 16)))
    assert resident.experts_implementation == "grouped_mm" and "grouped_mm" in repr(resident)
    resident.config = None  # standing alone, as a stock experts module without a config: the eager loop
    assert resident.experts_implementation == "eager"
    resident.config = stock.config
    stock.config._experts_implementation = "sonicmoe"
    x, index, weights = routing(48, 4, 2)
    with pytest.raises(ExpertsImplementationError, match=r"'sonicmoe'.*dequantize=True") as caught:
        resident(x, index, weights)
    assert isinstance(caught.value, ConfigError)


def test_expert_groups_keep_hit_experts_in_order_and_drop_sentinels() -> None:
    ids = torch.tensor([0, 0, 2, 2, 2, 4])  # 4 == num_experts: the eager loop's skipped sentinel
    groups = ExpertGroups.of(ids, 4)
    assert (groups.experts, groups.counts, groups.rows) == ((0, 2), (2, 3), 6)
    assert groups.runs(1) == [(0, 1, 0, 2), (1, 2, 2, 5)]


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16])
def test_the_grouped_dequantization_is_the_loaders_bit_for_bit(
    fp8_dtype: torch.dtype, dtype: torch.dtype
) -> None:
    """Every finite code under scales spanning 2**-20..2**4, in a 40 x 56 matrix of 16 x 16 blocks (partial edge
    blocks on both axes), against the loader's ``dequantize`` (large enough for its CPU table path too)."""
    g = torch.Generator().manual_seed(0)
    finite = torch.arange(256, dtype=torch.uint8)
    finite = finite[torch.isfinite(finite.view(fp8_dtype).float())]
    for rows, cols in ((40, 56), (80, 104)):
        codes = finite[torch.randint(len(finite), (rows, cols), generator=g)]
        grid = (
            2.0
            ** torch.randint(-20, 5, (3 if rows == 40 else 5, 4 if cols == 56 else 7), generator=g).float()
        )
        grid = grid * (1 + torch.rand(grid.shape, generator=g))
        if dtype == torch.float16:
            grid = grid.clamp(max=1.0)  # 57344 (e5m2's largest) x 2 overflows FP16: the loader refuses it
        layout = fp8_grouped.DequantLayout(fp8_dtype, (16, 16), dtype, rows_per_chunk=1 << 62)
        got = fp8_grouped.dequantize_block_matrix(codes, grid, layout, torch.empty(rows, cols, dtype=dtype))
        want = dequantize(codes.view(fp8_dtype), grid, dtype=dtype, block_size=(16, 16))
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (rows, cols)
