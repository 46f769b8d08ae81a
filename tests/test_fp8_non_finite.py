"""``dequantize`` never returns NaN or inf: FP8 NaN/inf codes and products that overflow the target dtype raise
``NonFiniteWeightError`` naming the position, the byte and the scale, on the table-lookup path (CPU, >= 4096
elements) and the torch path alike, while values that merely come close are decoded exactly."""

from __future__ import annotations

import re

import pytest
import torch

from automodel_plugins import fp8
from automodel_plugins.errors import NonFiniteWeightError
from automodel_plugins.fp8 import decode as fp8_decode
from automodel_plugins.fp8.decode import table_lookup_applies

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BAD_CODES = {E4M3: [0x7F, 0xFF], E5M2: [0x7C, 0x7D, 0x7E, 0x7F, 0xFC, 0xFD, 0xFE, 0xFF]}
SHAPES = {"table": (64, 128), "torch": (6, 10)}  # 8192 elements take the table; 60 do not


def ones(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(shape).to(dtype)


def with_byte(weight: torch.Tensor, position: tuple[int, int], byte: int) -> torch.Tensor:
    raw = weight.view(torch.uint8).clone()
    raw[position] = byte
    return raw.view(weight.dtype)


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize(
    ("fp8_dtype", "byte"), [(d, b) for d, codes in BAD_CODES.items() for b in codes], ids=lambda v: str(v)
)
def test_every_nan_and_inf_code_is_refused(path: str, fp8_dtype: torch.dtype, byte: int) -> None:
    weight = with_byte(ones(SHAPES[path], fp8_dtype), (2, 7), byte)
    assert table_lookup_applies(weight, torch.bfloat16) == (path == "table")
    with pytest.raises(
        NonFiniteWeightError, match=rf"at \(2, 7\) is .*byte {byte:#04x} is an? (NaN|inf) code"
    ) as caught:
        fp8.dequantize(
            weight, torch.tensor(0.5), dtype=torch.bfloat16, key="w.weight", path="/ckpt/x.safetensors"
        )
    assert caught.value.key == "w.weight" and "/ckpt/x.safetensors" in str(caught.value)


def test_fnuz_nan_code_is_refused() -> None:
    """The fnuz formats' only NaN is 0x80 (negative zero elsewhere): not a top code, so the generic check."""
    weight = with_byte(ones((64, 128), torch.float8_e4m3fnuz), (5, 5), 0x80)
    with pytest.raises(NonFiniteWeightError, match=r"at \(5, 5\) is nan"):
        fp8.dequantize(weight, torch.tensor(1.0), dtype=torch.bfloat16)


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 3e38), (torch.float16, 200.0)])
def test_a_finite_scale_that_overflows_is_refused_only_where_it_does(
    path: str, dtype: torch.dtype, scale: float
) -> None:
    """448 x 3e38 overflows fp32/bf16 and 448 x 200 overflows fp16; 0.5 times either does not."""
    small = (torch.ones(SHAPES[path]) * 0.5).to(E4M3)
    s = torch.tensor(scale)
    assert torch.equal(fp8.dequantize(small, s, dtype=dtype), (small.float() * s).to(dtype))
    big = small.clone()
    big[1, 3] = 448.0
    with pytest.raises(
        NonFiniteWeightError,
        match=rf"at \(1, 3\) is inf: stored value 448.0 \(byte 0x7e\) times scale {re.escape(f'{scale:g}')} overflows",
    ):
        fp8.dequantize(big, s, dtype=dtype)


@pytest.mark.parametrize("path", list(SHAPES))
def test_block_overflow_is_located_in_its_block(path: str) -> None:
    """Only the block with the huge scale overflows; 448 elsewhere is fine, and a region without it loads."""
    rows, cols = SHAPES[path]
    weight = torch.full((rows, cols), 448.0).to(E4M3)
    grid = torch.ones(2, 2)
    grid[1, 0] = 1e36  # 448e36 > fp32 max
    block = (rows // 2, cols // 2)
    with pytest.raises(
        NonFiniteWeightError, match=rf"at \({rows // 2}, 0\) is inf: .* times scale 1e\+36"
    ) as caught:
        fp8.dequantize(weight, grid, dtype=torch.bfloat16, block_size=block)
    assert f"{block[0] * block[1]} non-finite value(s)" in str(caught.value)
    top = (slice(0, rows // 2), slice(0, cols))
    part = fp8.dequantize(weight[top].contiguous(), grid, dtype=torch.bfloat16, block_size=block, region=top)
    assert torch.equal(part, torch.full((rows // 2, cols), 448.0, dtype=torch.bfloat16))
    bottom = (slice(rows // 2 + 1, rows), slice(0, cols))
    with pytest.raises(NonFiniteWeightError, match=r"at \(0, 0\) is inf"):  # positions are region-relative
        fp8.dequantize(
            weight[bottom].contiguous(), grid, dtype=torch.bfloat16, block_size=block, region=bottom
        )


def test_largest_finite_values_under_a_scale_near_the_limit_are_exact() -> None:
    """Every finite e4m3fn value times a scale that keeps 448 just finite in bf16: no false alarm."""
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F].repeat(40)[:8192].reshape(64, 128).contiguous().view(E4M3)
    s = torch.tensor(torch.finfo(torch.bfloat16).max / 448 / 1.01)
    assert torch.equal(fp8.dequantize(every, s, dtype=torch.bfloat16), (every.float() * s).to(torch.bfloat16))


@pytest.mark.parametrize("block_size", [None, (32, 32)], ids=["per-tensor", "block"])
def test_a_bad_byte_in_the_last_of_many_chunks_is_found(
    monkeypatch: pytest.MonkeyPatch, block_size: tuple[int, int] | None
) -> None:
    """The bytes are checked chunk by chunk as the table lookup reads them: the last chunk counts too."""
    monkeypatch.setattr(fp8_decode, "_LUT_CHUNK_PAIRS", 300)  # 96 x 128 / 2 pairs: 21 chunks, none aligned
    weight = with_byte(ones((96, 128), E4M3), (95, 127), 0xFF)
    scale = torch.tensor(0.5) if block_size is None else torch.full((3, 4), 0.5)
    assert table_lookup_applies(weight, torch.bfloat16)
    with pytest.raises(NonFiniteWeightError, match=r"at \(95, 127\) is nan"):
        fp8.dequantize(weight, scale, dtype=torch.bfloat16, block_size=block_size)
