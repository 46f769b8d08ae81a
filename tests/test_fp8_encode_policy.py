"""The encode side of FP8 saving: amax per tensor and per block (from any region), the table-driven encoder, and
the scale policy, each against a plain reference written here."""

from __future__ import annotations

import math

import pytest
import torch

from automodel_plugins.fp8.amax import all_reduce_max, block_amax, tensor_amax
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.encode import amax_scale, encode
from automodel_plugins.fp8.scale_policy import choose_scale, fit_limit
from automodel_plugins.fp8.scales import E8M0_DTYPE, encode_scale

BF16 = torch.bfloat16


def reference_encode(values: torch.Tensor, expanded_scale: torch.Tensor, fp8_dtype=torch.float8_e4m3fn):
    fp8_max = torch.finfo(fp8_dtype).max
    return (values.float() / expanded_scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)


def reference_block_amax(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = values.shape
    grid = torch.zeros(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            part = values[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            grid[i, j] = part.float().abs().max()
    return grid


def expand(grid: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    return grid.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# --- amax -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_tensor_amax_is_the_largest_magnitude(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(333, 77, generator=g) * 3).to(dtype)
    values[5, 6] = -50.0
    assert tensor_amax(values).item() == values.float().abs().max().item() == 50.0
    assert tensor_amax(torch.empty(0, 3, dtype=dtype)).item() == 0.0
    assert tensor_amax(torch.tensor(-2.5, dtype=dtype)).item() == 2.5


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_makes_the_amax_inf(dtype: torch.dtype, bad: float) -> None:
    values = torch.ones(100, 100, dtype=dtype)
    values[99, 98] = bad
    assert tensor_amax(values).item() == math.inf
    grid = block_amax(values, (32, 32), (4, 4))
    assert grid[3, 3].item() == math.inf and grid[0, 0].item() == 1.0


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [(16, 16), (32, 24), (128, 128)])
def test_block_amax_of_any_region_combines_to_the_whole(block: tuple[int, int], dtype: torch.dtype) -> None:
    """Rows and columns cut at unaligned places (as FSDP2 / tensor-parallel shards are): the MAX of the parts'
    grids is the whole weight's grid."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(150, 130, generator=g) * torch.logspace(-2, 1, 130)).to(dtype)
    grid_shape = (math.ceil(150 / block[0]), math.ceil(130 / block[1]))
    whole = block_amax(weight, block, grid_shape)
    assert torch.equal(whole, reference_block_amax(weight, block))
    for row_cut, col_cut in [(37, 61), (75, 0), (0, 65), (149, 129)]:
        parts = [
            block_amax(weight[:row_cut, :col_cut], block, grid_shape, origin=(0, 0)),
            block_amax(weight[:row_cut, col_cut:], block, grid_shape, origin=(0, col_cut)),
            block_amax(weight[row_cut:, :col_cut], block, grid_shape, origin=(row_cut, 0)),
            block_amax(weight[row_cut:, col_cut:], block, grid_shape, origin=(row_cut, col_cut)),
        ]
        combined = torch.stack(parts).amax(0)
        assert torch.equal(combined, whole), (row_cut, col_cut)


def test_all_reduce_max_outside_a_distributed_run_is_the_identity() -> None:
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_max(t) is t and t.tolist() == [1.0, 2.0]


# --- encode -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", [1.0, 0.0123, 3.1e-5, 7.0 / 448])
def test_the_table_encoder_equals_the_formula_on_every_16_bit_value(dtype, fp8_dtype, scale) -> None:
    """All 65536 bit patterns (NaN aside), as the table path sees them (>= 4096 values on CPU)."""
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    scale_t = torch.tensor(scale)
    got = encode(values, scale_t, fp8_dtype=fp8_dtype)
    assert torch.equal(bytes_of(got), bytes_of(reference_encode(values, scale_t, fp8_dtype)))


@pytest.mark.parametrize("block", [None, (16, 16), (32, 24)])
def test_encoding_a_region_gives_the_bytes_of_that_region_of_the_whole(block) -> None:
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(90, 70, generator=g) * 0.05).to(BF16)
    if block is None:
        scale = torch.tensor(0.05 * 4 / 448)
        expanded = scale
    else:
        scale = torch.rand(math.ceil(90 / block[0]), math.ceil(70 / block[1]), generator=g) * 1e-3 + 1e-4
        expanded = expand(scale, block, (90, 70))
    whole = encode(weight, scale, block_size=block)
    assert torch.equal(bytes_of(whole), bytes_of(reference_encode(weight, expanded)))
    for rows, cols in [
        (slice(0, 45), slice(0, 70)),
        (slice(45, 90), slice(33, 70)),
        (slice(17, 18), slice(5, 69)),
    ]:
        part = encode(weight[rows, cols], scale, block_size=block, origin=(rows.start, cols.start))
        assert torch.equal(bytes_of(part), bytes_of(whole[rows, cols]))


def test_amax_scale_maps_the_amax_onto_the_largest_fp8_value() -> None:
    assert amax_scale(torch.tensor(896.0)).item() == 2.0
    assert amax_scale(torch.tensor(0.0)).item() == 1.0
    assert amax_scale(torch.tensor(57344.0), torch.float8_e5m2).item() == 1.0


# --- the scale policy -------------------------------------------------------------------------------------


def test_fit_limit_is_the_largest_value_plus_half_an_ulp() -> None:
    assert fit_limit(torch.float8_e4m3fn) == 464.0
    assert fit_limit(torch.float8_e5m2) == 61440.0
    # Past the limit, the clamp would cost more than FP8's rounding; below it, rounding gives the max anyway.
    assert torch.tensor(463.9).to(torch.float8_e4m3fn).float().item() == 448.0


@pytest.mark.parametrize("scale_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_fp8_code_round_trips_through_bf16_with_its_own_scale(scale_dtype, fp8_dtype) -> None:
    """Dequantized to BF16 (what the model holds) and re-encoded with the same scale: the same bytes, and the
    amax never looks past the fit limit, so the policy keeps the scale."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype)
    codes = codes[torch.isfinite(codes.float())]
    g = torch.Generator().manual_seed(3)
    for raw in torch.exp(torch.empty(300).uniform_(math.log(1e-8), math.log(1e2), generator=g)):
        scale = raw.reshape(()).to(scale_dtype)
        model_values = dequantize(codes, scale, dtype=BF16)
        again = encode(model_values, scale.float(), fp8_dtype=fp8_dtype)
        assert torch.equal(bytes_of(again), bytes_of(codes)), scale.item()
        choice = choose_scale(
            tensor_amax(model_values), source=scale, scale_dtype=scale_dtype, fp8_dtype=fp8_dtype
        )
        assert choice.all_kept and torch.equal(choice.stored, scale)


def test_a_scale_is_kept_while_the_values_fit_it_and_replaced_once_they_do_not() -> None:
    source = torch.tensor(0.5)
    kept = choose_scale(
        torch.tensor(232.0), source=source, scale_dtype=torch.float32, fp8_dtype=torch.float8_e4m3fn
    )
    assert kept.all_kept and kept.stored.item() == 0.5 and (kept.kept, kept.fresh) == (1, 0)
    fresh = choose_scale(
        torch.tensor(232.5), source=source, scale_dtype=torch.float32, fp8_dtype=torch.float8_e4m3fn
    )
    assert not fresh.all_kept and fresh.stored.item() == pytest.approx(232.5 / 448)
    shrunk = choose_scale(
        torch.tensor(1.0), source=source, scale_dtype=torch.float32, fp8_dtype=torch.float8_e4m3fn
    )
    assert shrunk.stored.item() == 0.5, "a weight that shrank keeps its scale (no clipping either way)"


def test_block_scales_are_chosen_block_by_block_in_the_source_dtype() -> None:
    source = torch.tensor([[1.0, 1.0], [0.01, 2.0]], dtype=BF16)
    amax = torch.tensor([[448.0, 500.0], [0.0, 900.0]])
    choice = choose_scale(amax, source=source, scale_dtype=BF16, fp8_dtype=torch.float8_e4m3fn)
    assert choice.stored.dtype == BF16 and (choice.kept, choice.fresh) == (3, 1)
    expected = torch.tensor([[1.0, 500.0 / 448], [0.01, 2.0]]).to(BF16)
    assert torch.equal(choice.stored, expected)


def test_fresh_scales_without_a_source_and_in_e8m0() -> None:
    amax = torch.tensor([[896.0, 0.0]])
    fresh = choose_scale(amax, source=None, scale_dtype=torch.float32, fp8_dtype=torch.float8_e4m3fn)
    assert fresh.stored.tolist() == [[2.0, 1.0]] and fresh.fresh == 2
    if E8M0_DTYPE is not None:
        source = encode_scale(torch.tensor([[1.0, 4.0]]), E8M0_DTYPE)
        choice = choose_scale(
            torch.tensor([[900.0, 5.0]]), source=source, scale_dtype=E8M0_DTYPE, fp8_dtype=torch.float8_e4m3fn
        )
        assert choice.stored.dtype == E8M0_DTYPE and choice.stored.float().tolist() == [[4.0, 4.0]]


def test_a_per_tensor_scale_keeps_its_shape() -> None:
    choice = choose_scale(
        torch.tensor(1.0),
        source=torch.tensor([0.25]),
        scale_dtype=torch.float32,
        fp8_dtype=torch.float8_e4m3fn,
    )
    assert choice.stored.shape == (1,)
