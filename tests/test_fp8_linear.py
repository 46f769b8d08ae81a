"""``Fp8Linear`` on its own, against independent references: ``nn.Linear`` holding the weight dequantized by the
plain formula written here (``codes.float() * expanded scale``, rounded once), with torch's own autograd."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from automodel_plugins.errors import FrozenFp8WeightError, ScaleError
from automodel_plugins.fp8 import encode_scale, quantize
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.fp8_resident import Fp8Codes
from automodel_plugins.testing.residency import watch_weight_copies

E4M3, E5M2, BF16, F32 = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32
SHAPES = [  # (out, in, block): full blocks, partial edge blocks on both axes, per tensor
    (64, 96, (32, 32)),
    (72, 100, (32, 32)),
    (40, 24, None),
]


def reference_weight(codes: torch.Tensor, scale: torch.Tensor, block, dtype: torch.dtype) -> torch.Tensor:
    """The dequantization, written plainly: every element times its block's (or the tensor's) scale in fp32."""
    scale = scale.float()
    if block is None:
        return (codes.float() * scale.reshape(())).to(dtype)
    rows, cols = codes.shape
    expanded = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (codes.float() * expanded).to(dtype)


def make_layer(out_features: int, in_features: int, block, dtype=F32, *, bias=True, fp8=E4M3, seed=0):
    """An ``Fp8Linear`` and the reference ``nn.Linear`` holding its reference-dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.1
    codes, scale = quantize(w, block_size=block, fp8_dtype=fp8)
    b = torch.randn(out_features, generator=g) if bias else None
    layer = Fp8Linear.from_fp8(codes, scale, block_size=block, bias=b, compute_dtype=dtype)
    ref = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(reference_weight(codes, scale, block, dtype))
        if bias:
            ref.bias.copy_(b.to(dtype))
    ref.weight.requires_grad_(False)
    return layer, ref, codes, scale


def inputs(in_features: int, dtype=F32, *, tokens=(2, 7), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*tokens, in_features, generator=g).to(dtype).requires_grad_(True)


@pytest.mark.parametrize(("out_features", "in_features", "block"), SHAPES)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_forward_and_gradients_equal_a_dequantized_linear(out_features, in_features, block, dtype) -> None:
    layer, ref, _, _ = make_layer(out_features, in_features, block, dtype)
    x, x_ref = inputs(in_features, dtype), inputs(in_features, dtype)
    out, expected = layer(x), ref(x_ref)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.bias.grad, ref.bias.grad)
    assert layer.weight.grad is None


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_e5m2_and_e4m3_codes_dequantize_exactly(fp8) -> None:
    layer, ref, codes, _ = make_layer(48, 64, (16, 16), fp8=fp8)
    assert layer.fp8_dtype == fp8 and torch.equal(layer.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(layer.dequantized_weight(), ref.weight)


@pytest.mark.parametrize(("out_features", "in_features", "block"), SHAPES)
def test_row_chunks_bound_the_transient_and_agree_within_rounding(out_features, in_features, block) -> None:
    layer, ref, _, _ = make_layer(out_features, in_features, block)
    layer.dequant_budget_bytes = (
        9 * in_features * 4
    )  # 9 rows at a time: chunks cut blocks and the last is short
    x, x_ref = inputs(in_features), inputs(in_features)
    with watch_weight_copies(layer) as watch:
        out = layer(x)
        out.sum().backward()
    expected = ref(x_ref)
    expected.sum().backward()
    torch.testing.assert_close(
        out, expected, rtol=1e-6, atol=1e-6
    )  # BLAS blocks a narrower matmul differently
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)  # and the backward sums the blocks
    assert watch.created == 0  # never a whole dequantized weight, only 9-row blocks


def test_autograd_saves_the_codes_not_a_dequantized_weight() -> None:
    layer, _, _, _ = make_layer(64, 96, (32, 32))
    with watch_weight_copies(layer) as watch:
        out = layer(inputs(96))
        assert watch.alive() == 0  # the dequantized copy died inside the layer
        out.sum().backward()
    assert watch.created == 2  # one dequant in the forward, one in the backward
    assert watch.peak_alive == 1 and watch.alive_after_layers == [0]
    assert watch.saved_copies == [] and ((64, 96), torch.uint8) in watch.saved


def test_the_watch_catches_a_layer_that_keeps_its_dequantized_weight_for_backward() -> None:
    """The negative control: dequantizing outside autograd (torchao's weight-only path does) saves the copy."""
    layer, _, _, _ = make_layer(64, 96, (32, 32))

    class Naive(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, layer.dequantized_weight(), layer.bias)

    naive = Naive()
    with watch_weight_copies(naive, layers=[layer]) as watch:
        out = naive(inputs(96))
        alive_after_forward = watch.alive()
        out.sum().backward()
    assert alive_after_forward == 1 and watch.saved_copies


def test_no_graph_without_gradients_and_the_same_values() -> None:
    layer, ref, _, _ = make_layer(72, 100, (32, 32))
    with torch.no_grad():
        assert torch.equal(layer(inputs(100)), ref(inputs(100)))
    x = inputs(100).detach()
    layer.bias.requires_grad_(False)
    out = layer(x)
    assert out.grad_fn is None


def test_to_dtype_keeps_codes_and_fp32_scale_and_moves_the_compute_dtype() -> None:
    layer, ref, codes, scale = make_layer(72, 100, (32, 32))
    layer.to(BF16)
    assert layer.weight.dtype == torch.uint8 and isinstance(layer.weight, Fp8Codes)
    assert torch.equal(layer.codes.view(torch.uint8), codes.view(torch.uint8))
    assert layer.weight_scale_inv.dtype == F32 and torch.equal(layer.weight_scale_inv, scale)
    assert layer.compute_dtype == BF16 and layer.bias.dtype == BF16
    # a dequantize-at-load BF16 model holds the fp32 product rounded once: the fp32 reference cast to bf16
    assert torch.equal(layer.dequantized_weight(), ref.weight.to(BF16))
    layer.float()
    assert layer.compute_dtype == F32 and torch.equal(layer.dequantized_weight(), ref.weight)
    with pytest.raises(TypeError, match="codes"):
        layer.type(torch.float16)  # casts integer tensors too


def test_meta_and_to_empty_keep_the_frozen_codes_parameter() -> None:
    layer, _, _, _ = make_layer(40, 24, None)
    layer.to("meta")
    assert isinstance(layer.weight, Fp8Codes) and layer.weight.is_meta and layer.weight_scale_inv.is_meta
    layer.to_empty(device="cpu")
    assert isinstance(layer.weight, Fp8Codes) and layer.weight.dtype == torch.uint8
    assert layer.weight_scale_inv.dtype == F32 and layer.weight_scale_inv.shape == ()


def test_state_dict_has_the_checkpoint_layout_and_round_trips() -> None:
    layer, ref, codes, _ = make_layer(72, 100, (32, 32))
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "weight_scale_inv"]
    assert state["weight"].dtype == E4M3 and torch.equal(
        state["weight"].view(torch.uint8), codes.view(torch.uint8)
    )
    assert state["weight_scale_inv"].shape == (3, 4)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh, _, _, _ = make_layer(72, 100, (32, 32), seed=5)
    assert not torch.equal(fresh.dequantized_weight(), ref.weight)
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.dequantized_weight(), ref.weight) and isinstance(fresh.weight, Fp8Codes)
    assigned, _, _, _ = make_layer(72, 100, (32, 32), seed=5)
    assigned.load_state_dict(loaded, assign=True)
    assert isinstance(assigned.weight, Fp8Codes) and torch.equal(assigned.dequantized_weight(), ref.weight)


@pytest.mark.parametrize("scale_dtype", [BF16, torch.uint8])
def test_a_stored_scale_decodes_to_fp32_and_encodes_back_byte_identically(scale_dtype) -> None:
    w = torch.randn(72, 100) * 0.1
    codes, stored = quantize(w, block_size=(32, 32), scale_dtype=scale_dtype)
    layer = Fp8Linear.from_fp8(codes, stored, block_size=(32, 32), compute_dtype=F32)
    assert layer.scale_dtype == scale_dtype and layer.weight_scale_inv.dtype == F32
    again = encode_scale(layer.weight_scale_inv, layer.scale_dtype)
    assert again.dtype == stored.dtype and torch.equal(again.view(torch.uint8), stored.view(torch.uint8))
    multipliers = stored.float() if scale_dtype == BF16 else 2.0 ** (stored.float() - 127)  # E8M0 bytes
    assert torch.equal(layer.dequantized_weight(), reference_weight(codes, multipliers, (32, 32), F32))


def test_a_per_tensor_scale_stored_as_one_element_becomes_0d() -> None:
    codes, scale = quantize(torch.randn(8, 16), block_size=None)
    layer = Fp8Linear.from_fp8(codes, scale.reshape(1), block_size=None, compute_dtype=F32)
    assert layer.weight_scale_inv.shape == ()
    with pytest.raises(ScaleError, match="does not fit"):
        Fp8Linear.from_fp8(codes, torch.ones(2), block_size=None)


def test_to_linear_is_a_stock_linear_with_the_dequantized_weight() -> None:
    layer, ref, _, _ = make_layer(72, 100, (32, 32))
    linear = layer.to_linear()
    assert (
        type(linear) is nn.Linear
        and torch.equal(linear.weight, ref.weight)
        and torch.equal(linear.bias, ref.bias)
    )


def test_asking_the_codes_for_gradients_is_an_error_not_a_silently_frozen_layer() -> None:
    layer, _, _, _ = make_layer(40, 24, None)
    model = nn.Sequential(nn.Linear(24, 24), layer)
    with pytest.raises(FrozenFp8WeightError, match="frozen"):
        model.requires_grad_(True)
    with pytest.raises(FrozenFp8WeightError):
        layer.weight.requires_grad = True
    with pytest.raises(FrozenFp8WeightError):
        Fp8Codes(torch.zeros(2, 2, dtype=torch.uint8), requires_grad=True)
    model.requires_grad_(False)  # freezing is fine
    copied = copy.deepcopy(layer)
    assert isinstance(copied.weight, Fp8Codes) and torch.equal(copied.weight, layer.weight)


def test_repr_names_the_format() -> None:
    layer, _, _, _ = make_layer(72, 100, (32, 32))
    assert "fp8=float8_e4m3fn" in repr(layer) and "block_size=(32, 32)" in repr(layer)
    assert math.prod(layer.scale_shape) == 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("out_features", "in_features", "block"), SHAPES)
def test_cuda_forward_and_gradients_equal_a_dequantized_linear(out_features, in_features, block) -> None:
    layer, ref, _, _ = make_layer(out_features, in_features, block, BF16)
    layer, ref = layer.cuda(), ref.cuda()
    x, x_ref = inputs(in_features, BF16).detach().cuda(), inputs(in_features, BF16).detach().cuda()
    x.requires_grad_(True)
    x_ref.requires_grad_(True)
    out, expected = layer(x), ref(x_ref)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_under_cpu_autocast_it_computes_what_a_dequantized_linear_computes() -> None:
    layer, ref, _, _ = make_layer(72, 100, (32, 32))
    x, x_ref = inputs(100), inputs(100)
    with torch.autocast("cpu", dtype=BF16):
        out, expected = layer(x), ref(x_ref)
    assert out.dtype == expected.dtype == BF16 and torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert x.grad.dtype == F32 and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.bias.grad, ref.bias.grad)
