"""The CPU table-lookup dequant (``automodel_plugins.fp8.decode``) must give the bits of ``(w.float() * s).to(dtype)``.

Every byte value that decodes to a finite number is checked; the others (NaN/inf codes, values whose product with
the scale overflows) are refused, which ``tests/test_fp8_non_finite.py`` checks.
"""

from __future__ import annotations

import pytest
import torch

from automodel_plugins import fp8
from automodel_plugins.fp8 import decode as fp8_decode
from automodel_plugins.fp8.decode import table_lookup_applies

FP8 = [
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
]


def every_byte(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random fp8 bytes (NaN and negative zero included) with all 256 values present (when it holds 256)."""
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    n = min(256, raw.numel())
    raw.view(-1)[:n] = torch.arange(n, dtype=torch.uint8)
    return raw.view(dtype)


def finite_under(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` with every byte that the reference decodes to NaN or inf (times ``scale``, in ``dtype``) set to 0."""
    bad = ~torch.isfinite((w.float() * scale).to(dtype))
    raw = w.view(torch.uint8).clone()
    raw[bad] = 0
    return raw.view(w.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [0.0123, 3.5e-5, 1.0, 7.77])
def test_per_tensor_table_is_bit_exact(fp8_dtype: torch.dtype, dtype: torch.dtype, scale: float) -> None:
    s = torch.tensor(scale)
    w = finite_under(every_byte((96, 130), fp8_dtype), s, dtype)
    assert table_lookup_applies(w, dtype)
    assert torch.equal(bits(fp8.dequantize(w, s, dtype=dtype)), bits((w.float() * s).to(dtype)))


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_table_is_bit_exact(fp8_dtype: torch.dtype, dtype: torch.dtype) -> None:
    grid = torch.rand(3, 3, generator=torch.Generator().manual_seed(2)) + 0.01
    expanded = grid.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    w = finite_under(every_byte((300, 260), fp8_dtype, seed=1), expanded, dtype)
    got = fp8.dequantize(w, grid, dtype=dtype, block_size=(128, 128))
    assert torch.equal(bits(got), bits((w.float() * expanded).to(dtype)))


def test_table_spans_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        fp8_decode, "_LUT_CHUNK_PAIRS", 1000
    )  # 4096 x 3 / 2 pairs: 7 chunks, the last partial
    s = torch.tensor(0.5)
    w = finite_under(every_byte((4096, 3), torch.float8_e4m3fn, seed=3), s, torch.bfloat16)
    assert torch.equal(
        bits(fp8.dequantize(w, s, dtype=torch.bfloat16)), bits((w.float() * s).to(torch.bfloat16))
    )


def finite(weight: torch.Tensor) -> torch.Tensor:
    return finite_under(weight, torch.tensor(1.0), torch.float32)


@pytest.mark.parametrize(
    "weight",
    [
        finite(every_byte((4097,), torch.float8_e4m3fn)),  # odd element count
        finite(every_byte((130, 96), torch.float8_e4m3fn)).t(),  # not contiguous
        finite(every_byte((10, 10), torch.float8_e4m3fn)),  # too small to pay for a table
    ],
)
def test_fallback_cases_skip_the_table_and_stay_exact(weight: torch.Tensor) -> None:
    assert not table_lookup_applies(weight, torch.bfloat16)
    s = torch.tensor(0.25)
    got, expected = fp8.dequantize(weight, s, dtype=torch.bfloat16), (weight.float() * s).to(torch.bfloat16)
    assert torch.equal(bits(got), bits(expected))


def block_reference(
    w: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], origin=(0, 0)
) -> torch.Tensor:
    rows, cols = w.shape
    r = (torch.arange(origin[0], origin[0] + rows) // block[0]).tolist()
    c = (torch.arange(origin[1], origin[1] + cols) // block[1]).tolist()
    return w.float() * fp8.decode_scale(grid)[r][:, c]


@pytest.mark.parametrize("chunk_pairs", [1 << 16, 300])  # 300: several takes per block row, none aligned
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_regions_and_partial_edges_are_bit_exact(
    monkeypatch: pytest.MonkeyPatch, chunk_pairs: int, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(fp8_decode, "_LUT_CHUNK_PAIRS", chunk_pairs)
    w = finite(every_byte((203, 150), torch.float8_e4m3fn, seed=4))  # 64x64 blocks: partial last blocks
    grid = torch.rand(4, 3, generator=torch.Generator().manual_seed(5)) + 0.01
    full = fp8.dequantize(w, grid, dtype=dtype, block_size=(64, 64))
    assert torch.equal(bits(full), bits(block_reference(w, grid, (64, 64)).to(dtype)))
    region = (slice(37, 181), slice(70, 150))  # starts inside a block on both axes
    part = fp8.dequantize(w[region].contiguous(), grid, dtype=dtype, block_size=(64, 64), region=region)
    assert table_lookup_applies(w[region].contiguous(), dtype)
    assert torch.equal(bits(part), bits(full[region]))


def test_block_table_with_e8m0_byte_grid() -> None:
    w = finite(every_byte((256, 256), torch.float8_e4m3fn, seed=6))
    grid = torch.randint(110, 135, (2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    got = fp8.dequantize(w, grid, dtype=torch.bfloat16, block_size=(128, 128))
    assert torch.equal(bits(got), bits(block_reference(w, grid, (128, 128)).to(torch.bfloat16)))


@pytest.mark.parametrize("block_size", [None, (16, 16)])
def test_the_table_path_leaves_the_weight_storage_resizable(block_size) -> None:
    """FSDP2 frees an unsharded parameter by resizing its storage to 0; ``Tensor.numpy()`` would forbid that."""
    weight = torch.randn(64, 96).to(torch.float8_e4m3fn)
    scale = torch.ones(()) if block_size is None else torch.ones(4, 6)
    assert fp8_decode.table_lookup_applies(weight, torch.bfloat16)
    expected = weight.float().to(torch.bfloat16)
    assert torch.equal(fp8.dequantize(weight, scale, dtype=torch.bfloat16, block_size=block_size), expected)
    weight.untyped_storage().resize_(0)  # raises "not resizable" after a Tensor.numpy()
    assert weight.untyped_storage().nbytes() == 0
