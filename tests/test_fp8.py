"""FP8 dequantization against independent references (inline math and transformers' own dequant)."""

from __future__ import annotations

import math

import pytest
import torch

from automodel_plugins.errors import ScaleError
from automodel_plugins.fp8 import (
    ACTIVATION_SCALE_SUFFIXES,
    FP8_DTYPES,
    WEIGHT_SCALE_SUFFIXES,
    activation_key_candidates,
    decode_scale,
    dequantize,
    is_fp8,
    quantize,
    scale_key_candidates,
    validate_scale,
)
from automodel_plugins.fp8 import decode as fp8_decode

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16

# --- references ------------------------------------------------------------------------------------------


def random_fp8(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Random fp8 weight that contains every finite fp8 bit pattern (and no NaN)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * cols,), generator=g, dtype=torch.uint8)
    every = torch.arange(256, dtype=torch.uint8)
    raw[: min(256, raw.numel())] = every[: raw.numel()]
    w = raw.view(dtype)
    w = torch.where(torch.isnan(w.float()), torch.zeros_like(w.float()), w.float()).to(dtype)
    return w.reshape(rows, cols)


def random_grid(rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cols, generator=g) * 2e-3 + 1e-5).to(dtype)


def block_reference(
    w8: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Element-by-block reference written independently: loop over blocks, fp32 product, one cast."""
    out = torch.empty(w8.shape, dtype=torch.float32)
    bm, bn = block
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            out[rows, cols] = w8[rows, cols].float() * grid[i, j].float()
    return out.to(dtype)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def hf_dequant():
    """transformers 5.x load-time dequant (``Fp8Dequantize._dequantize_one``): needs the grid to divide the
    weight exactly, so partial edge blocks are checked against ``_dequantize_fp8_weight`` in fp32 instead."""
    module = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(module, "Fp8Dequantize"):
        pytest.skip("this transformers has no Fp8Dequantize")
    return module


# --- names -----------------------------------------------------------------------------------------------


def test_constants_and_key_candidates():
    assert {torch.float8_e4m3fn, torch.float8_e5m2} <= FP8_DTYPES
    assert is_fp8(E4M3) and is_fp8(torch.float8_e5m2)
    assert not is_fp8(BF16) and not is_fp8(torch.uint8)
    if hasattr(torch, "float8_e8m0fnu"):
        assert not is_fp8(torch.float8_e8m0fnu)
    assert WEIGHT_SCALE_SUFFIXES == ("weight_scale_inv", "weight_scale", "qscale_weight")
    assert ACTIVATION_SCALE_SUFFIXES == ("activation_scale", "input_scale", "qscale_act")
    assert scale_key_candidates("a.b.weight") == [
        "a.b.weight_scale_inv",
        "a.b.weight_scale",
        "a.b.qscale_weight",
    ]
    assert activation_key_candidates("a.b.weight") == [
        "a.b.activation_scale",
        "a.b.input_scale",
        "a.b.qscale_act",
    ]
    assert scale_key_candidates("weight") == ["weight_scale_inv", "weight_scale", "qscale_weight"]
    # Bare MoE parameters follow transformers' ``<param>_scale_inv`` convention.
    assert scale_key_candidates("mlp.experts.gate_up_proj") == [
        "mlp.experts.gate_up_proj_scale_inv",
        "mlp.experts.gate_up_proj_scale",
    ]
    assert activation_key_candidates("mlp.experts.down_proj") == [
        "mlp.experts.down_proj_activation_scale",
        "mlp.experts.down_proj_input_scale",
    ]


# --- per-tensor ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float32, BF16, torch.float16])
@pytest.mark.parametrize("target", [BF16, torch.float32, torch.float16])
@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1)])
def test_per_tensor_matches_inline_reference(scale_dtype, target, scale_shape):
    w8 = random_fp8(33, 70)
    s = torch.tensor(0.0123).to(scale_dtype).reshape(scale_shape)
    expected = (w8.float() * s.float()).to(target)
    assert_bit_equal(dequantize(w8, s, dtype=target), expected)


def test_per_tensor_differs_from_a_bf16_product():
    """The fp32 product is what the reference does; a bf16 x bf16 product must not sneak in."""
    w8 = random_fp8(64, 64)
    s = torch.tensor(0.0123)
    bf16_product = w8.to(BF16) * s.to(BF16)
    assert not torch.equal(dequantize(w8, s, dtype=BF16), bf16_product)


def test_per_tensor_nd_and_e5m2():
    w8 = random_fp8(6, 20, dtype=torch.float8_e5m2).reshape(2, 3, 20)
    s = torch.tensor(3.5)
    assert_bit_equal(dequantize(w8, s, dtype=BF16), (w8.float() * 3.5).to(BF16))
    vec = random_fp8(1, 17).reshape(17)
    assert_bit_equal(dequantize(vec, s, dtype=BF16), (vec.float() * 3.5).to(BF16))


def test_per_tensor_matches_transformers(hf_dequant):
    w8 = random_fp8(48, 80)
    for scale_dtype in (torch.float32, BF16):
        s = torch.tensor(0.00731).to(scale_dtype)
        for target in (BF16, torch.float32):
            expected = hf_dequant.Fp8Dequantize(None)._dequantize_one(w8, s, output_dtype=target)
            assert_bit_equal(dequantize(w8, s, dtype=target), expected)


def test_chunking_does_not_change_results(monkeypatch):
    w8 = random_fp8(37, 29)
    s = torch.tensor(0.02)
    grid = random_grid(5, 2)
    full_pt = dequantize(w8, s, dtype=BF16)
    full_blk = dequantize(w8, grid, dtype=BF16, block_size=(8, 16))
    monkeypatch.setattr(fp8_decode, "_CHUNK_ELEMENTS", 50)
    assert_bit_equal(dequantize(w8, s, dtype=BF16), full_pt)
    assert_bit_equal(dequantize(w8, grid, dtype=BF16, block_size=(8, 16)), full_blk)


# --- block scales ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((37, 53), (16, 8)), ((5, 7), (8, 8))],
)
@pytest.mark.parametrize("scale_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("target", [BF16, torch.float32])
def test_block_matches_reference(shape, block, scale_dtype, target):
    w8 = random_fp8(*shape)
    grid = random_grid(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]), scale_dtype)
    validate_scale(grid, weight_shape=shape, block_size=block, key="w")
    assert_bit_equal(
        dequantize(w8, grid, dtype=target, block_size=block), block_reference(w8, grid, block, target)
    )


@pytest.mark.parametrize("scale_dtype", [torch.float32, BF16, torch.uint8])
def test_block_matches_transformers_aligned(hf_dequant, scale_dtype):
    w8 = random_fp8(256, 384)
    grid = (
        random_grid(2, 3) if scale_dtype != torch.uint8 else torch.tensor([[120, 127, 130], [100, 127, 140]])
    )
    grid = grid.to(scale_dtype)
    for target in (BF16, torch.float32):
        expected = hf_dequant.Fp8Dequantize(None)._dequantize_one(w8, grid, output_dtype=target)
        assert_bit_equal(dequantize(w8, grid, dtype=target, block_size=(128, 128)), expected)


@pytest.mark.parametrize(
    ("shape", "block"), [((300, 200), (128, 128)), ((129, 257), (128, 128)), ((37, 53), (16, 8))]
)
def test_block_matches_transformers_partial_edges(hf_dequant, shape, block):
    w8 = random_fp8(*shape)
    grid = random_grid(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    # fp32 target: transformers' backward dequant multiplies in the target dtype, i.e. in fp32 here.
    expected32 = hf_dequant._dequantize_fp8_weight(w8, grid, list(block), torch.float32)
    assert_bit_equal(dequantize(w8, grid, dtype=torch.float32, block_size=block), expected32)
    assert_bit_equal(dequantize(w8, grid, dtype=BF16, block_size=block), expected32.to(BF16))


REGIONS = [
    (slice(0, 300), slice(0, 200)),
    (slice(37, 251), slice(5, 199)),
    (slice(128, 256), slice(128, 200)),
    (slice(299, 300), slice(0, 200)),
    (slice(1, 2), slice(127, 129)),
    (slice(130, 130), slice(0, 10)),
    (slice(None, 64), slice(100, None)),
]


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.uint8])
def test_block_regions_equal_full_dequant_sliced(region, scale_dtype):
    w8 = random_fp8(300, 200)
    grid = (
        random_grid(3, 2)
        if scale_dtype == torch.float32
        else torch.tensor([[110, 127], [131, 140], [1, 200]])  # 2**73 at most: no product overflows
    )
    grid = grid.to(scale_dtype)
    full = dequantize(w8, grid, dtype=BF16, block_size=(128, 128))
    part = dequantize(w8[region], grid, dtype=BF16, block_size=(128, 128), region=region)
    assert_bit_equal(part, full[region])


def test_row_only_region():
    w8 = random_fp8(40, 24)
    grid = random_grid(5, 3)
    full = dequantize(w8, grid, dtype=BF16, block_size=(8, 8))
    region = (slice(13, 31),)
    assert_bit_equal(dequantize(w8[region], grid, dtype=BF16, block_size=(8, 8), region=region), full[13:31])


def test_region_per_tensor_is_plain_dequant():
    w8 = random_fp8(20, 20)
    s = torch.tensor(0.5)
    region = (slice(3, 9), slice(4, 11))
    assert_bit_equal(
        dequantize(w8[region], s, dtype=BF16, region=region), dequantize(w8, s, dtype=BF16)[region]
    )


def test_bad_regions_and_grids():
    w8 = random_fp8(20, 20)
    grid = random_grid(3, 3)
    with pytest.raises(ValueError, match="step 1"):
        dequantize(w8[::2], grid, dtype=BF16, block_size=(8, 8), region=(slice(0, 20, 2), slice(None)))
    with pytest.raises(ValueError, match="non-negative"):
        dequantize(w8[-4:], grid, dtype=BF16, block_size=(8, 8), region=(slice(-4, None), slice(None)))
    with pytest.raises(ScaleError, match="does not cover"):
        dequantize(w8, grid, dtype=BF16, block_size=(8, 8), region=(slice(10, 30), slice(0, 20)))
    with pytest.raises(ScaleError, match=r"expected \(3, 3\)"):
        dequantize(w8, random_grid(2, 3), dtype=BF16, block_size=(8, 8))
    with pytest.raises(ScaleError, match="one element"):
        dequantize(w8, grid, dtype=BF16)


# --- E8M0 scales -----------------------------------------------------------------------------------------


def test_decode_scale():
    raw = torch.tensor([0, 126, 127, 128, 200, 254, 255], dtype=torch.uint8)
    decoded = decode_scale(raw)
    assert decoded.dtype == torch.float32
    expected = [2.0**-127, 0.5, 1.0, 2.0, 2.0**73, 2.0**127]
    assert decoded[:-1].tolist() == expected
    assert math.isnan(decoded[-1].item())
    assert decode_scale(torch.tensor([1.5], dtype=BF16)).dtype == torch.float32
    if hasattr(torch, "float8_e8m0fnu"):
        assert torch.equal(decode_scale(raw[:-1].view(torch.float8_e8m0fnu)), decoded[:-1])
    with pytest.raises(ScaleError, match="unsupported scale dtype"):
        decode_scale(torch.tensor([1], dtype=torch.int32))


def test_e8m0_uint8_block_scales():
    w8 = random_fp8(40, 24)
    grid = torch.tensor([[127, 120], [130, 126], [100, 140]], dtype=torch.uint8)
    expected = block_reference(w8, torch.exp2(grid.float() - 127), (16, 16), BF16)
    assert_bit_equal(dequantize(w8, grid, dtype=BF16, block_size=(16, 16)), expected)
    if hasattr(torch, "float8_e8m0fnu"):
        as_e8m0 = grid.view(torch.float8_e8m0fnu)
        validate_scale(as_e8m0, weight_shape=(40, 24), block_size=(16, 16), key="w")
        assert_bit_equal(dequantize(w8, as_e8m0, dtype=BF16, block_size=(16, 16)), expected)


def test_e8m0_uint8_per_tensor():
    w8 = random_fp8(8, 8)
    scale = torch.tensor(130, dtype=torch.uint8)
    assert_bit_equal(dequantize(w8, scale, dtype=BF16), (w8.float() * 8.0).to(BF16))


# --- validate_scale --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([[0.5]])])
def test_valid_per_tensor_scales(scale):
    validate_scale(scale, weight_shape=(4, 4), block_size=None, key="a.weight_scale_inv")
    validate_scale(scale.to(BF16), weight_shape=(4, 4), block_size=None, key="a.weight_scale_inv")


@pytest.mark.parametrize(
    ("bad", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (0.0, "0.0"), (-0.25, "-0.25")]
)
def test_bad_scale_values(bad, shown):
    key = "model.layers.3.mlp.down_proj.weight_scale_inv"
    with pytest.raises(ScaleError) as err:
        validate_scale(
            torch.tensor(bad), weight_shape=(4, 4), block_size=None, key=key, path="/ckpt/x.safetensors"
        )
    message = str(err.value)
    assert f"[{key}]" in message and f"scale value {shown}" in message and "/ckpt/x.safetensors" in message
    grid = torch.ones(3, 2)
    grid[2, 1] = bad
    with pytest.raises(ScaleError) as err:
        validate_scale(grid.to(BF16), weight_shape=(300, 200), block_size=(128, 128), key=key)
    assert f"[{key}]" in str(err.value) and "position (2, 1)" in str(err.value) and shown in str(err.value)


def test_e8m0_nan_byte_is_refused():
    grid = torch.tensor([[127, 255]], dtype=torch.uint8)
    with pytest.raises(ScaleError, match=r"stored byte 255\) at position \(0, 1\)") as err:
        validate_scale(grid, weight_shape=(100, 200), block_size=(128, 128), key="q.weight_scale_inv")
    assert "[q.weight_scale_inv]" in str(err.value)


def test_wrong_grid_shape():
    key = "x.weight_scale_inv"
    with pytest.raises(ScaleError) as err:
        validate_scale(torch.ones(2, 2), weight_shape=(300, 200), block_size=(128, 128), key=key)
    message = str(err.value)
    assert f"[{key}]" in message
    assert "(2, 2)" in message and "(300, 200)" in message and "(128, 128)" in message and "(3, 2)" in message
    with pytest.raises(ScaleError, match=r"\[x\.weight_scale_inv\].*2-D weight"):
        validate_scale(torch.ones(1, 1), weight_shape=(300,), block_size=(128, 128), key=key)
    with pytest.raises(ScaleError, match="positive integers"):
        validate_scale(torch.ones(1, 1), weight_shape=(3, 3), block_size=(0, 128), key=key)


def test_per_tensor_scale_with_many_elements():
    with pytest.raises(ScaleError, match=r"\[y\.weight_scale\].*one element.*\(2,\)"):
        validate_scale(torch.ones(2), weight_shape=(4, 4), block_size=None, key="y.weight_scale")


def test_scale_dtype_refused():
    for dtype in (torch.int32, torch.float64, E4M3):
        with pytest.raises(ScaleError, match=r"\[z\.qscale_weight\].*scale dtype"):
            validate_scale(
                torch.ones((), dtype=dtype), weight_shape=(4, 4), block_size=None, key="z.qscale_weight"
            )


# --- quantize --------------------------------------------------------------------------------------------


def fp8_error_bound(w: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp: relative for normals, absolute (scaled) in the subnormal range."""
    mantissa_bits = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[fp8_dtype]
    min_subnormal = {torch.float8_e4m3fn: 2.0**-9, torch.float8_e5m2: 2.0**-16}[fp8_dtype]
    relative = w.abs() * 2.0 ** -(mantissa_bits + 1)
    return torch.maximum(relative, scale * min_subnormal / 2) * 1.0001


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("block", [None, (128, 128), (16, 24)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, BF16, torch.uint8])
def test_quantize_round_trip(fp8_dtype, block, scale_dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 200)
    q, s = quantize(w, block_size=block, scale_dtype=scale_dtype, fp8_dtype=fp8_dtype)
    assert q.dtype == fp8_dtype and q.shape == w.shape and s.dtype == scale_dtype
    validate_scale(s, weight_shape=tuple(w.shape), block_size=block, key="w")
    restored = dequantize(q, s, dtype=torch.float32, block_size=block)
    if block is None:
        assert s.dim() == 0
        expanded = decode_scale(s).expand(w.shape)
    else:
        assert s.shape == (math.ceil(300 / block[0]), math.ceil(200 / block[1]))
        idx_r = torch.arange(300) // block[0]
        idx_c = torch.arange(200) // block[1]
        expanded = decode_scale(s)[idx_r][:, idx_c]
    assert ((restored - w).abs() <= fp8_error_bound(w, expanded, fp8_dtype)).all()


def test_quantize_scale_is_amax_over_fp8_max():
    w = torch.tensor([[1.0, -896.0], [3.0, 4.0]])
    q, s = quantize(w)
    assert s.item() == 2.0 and q.float().tolist() == [[0.5, -448.0], [1.5, 2.0]]
    q, s = quantize(w, block_size=(1, 1))
    assert torch.equal(s, torch.tensor([[1.0, 896.0], [3.0, 4.0]]) / 448)
    assert q.float().abs().max().item() == 448.0


def test_quantize_zero_weight_and_blocks():
    q, s = quantize(torch.zeros(5, 3))
    assert s.item() == 1.0 and not q.float().any()
    w = torch.zeros(5, 3)
    w[4, 2] = 7.0
    q, s = quantize(w, block_size=(4, 2))
    assert s.shape == (2, 2) and s.tolist() == [[1.0, 1.0], [1.0, 7.0 / 448]]
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("inf")]))


# --- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    """Same math on the GPU must give the same bits as on the CPU."""

    def test_per_tensor(self):
        w8 = random_fp8(513, 300)
        for s in (
            torch.tensor(0.0123),
            torch.tensor(0.0123, dtype=BF16),
            torch.tensor(120, dtype=torch.uint8),
        ):
            cpu = dequantize(w8, s, dtype=BF16)
            gpu = dequantize(w8.cuda(), s, dtype=BF16)  # the scale stays on the CPU: moved for us
            assert gpu.device.type == "cuda"
            assert_bit_equal(gpu.cpu(), cpu)

    @pytest.mark.parametrize("region", REGIONS)
    def test_block_regions(self, region):
        w8 = random_fp8(300, 200)
        grid = random_grid(3, 2)
        cpu = dequantize(w8[region], grid, dtype=BF16, block_size=(128, 128), region=region)
        gpu = dequantize(w8.cuda()[region], grid.cuda(), dtype=BF16, block_size=(128, 128), region=region)
        assert_bit_equal(gpu.cpu(), cpu)

    def test_quantize_and_validate(self):
        w = torch.randn(257, 130)
        q_cpu, s_cpu = quantize(w, block_size=(128, 128))
        q_gpu, s_gpu = quantize(w.cuda(), block_size=(128, 128))
        assert_bit_equal(q_gpu.cpu(), q_cpu)
        assert_bit_equal(s_gpu.cpu(), s_cpu)
        validate_scale(s_gpu, weight_shape=(257, 130), block_size=(128, 128), key="w")
