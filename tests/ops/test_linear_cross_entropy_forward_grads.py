"""The scalar-loss path of the fused loss: gradients formed in the forward over whole-vocabulary token chunks
(three matmuls), the backward only scaling them. Checked against F.cross_entropy with autograd on materialized
logits: fp64 for fp32 heads (1e-5), stock's bf16 path for bf16 heads (loss 1e-3 relative, cosine > 0.999)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from automodel_plugins.ops import grad_chunk_rows, linear_cross_entropy

from .test_linear_cross_entropy import IGNORE, MaxNumel, make_inputs, reference
from .test_linear_cross_entropy_bf16 import LargestFloat32, cosine, stock_bf16

BF16 = torch.bfloat16
OP = sys.modules["automodel_plugins.ops.linear_cross_entropy"]


@pytest.fixture
def path_calls(monkeypatch):
    """Counts of the gradients-in-forward pass and of the tiled backward, so each test knows which ran."""
    calls = {"forward_grads": 0, "tiled_backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(OP, "_forward_grads_impl", counted("forward_grads", OP._forward_grads_impl))
    monkeypatch.setattr(OP, "_backward_impl", counted("tiled_backward", OP._backward_impl))
    return calls


def ours(case: dict, **options) -> torch.Tensor:
    return linear_cross_entropy(case["x"], case["w"], case["t"], bias=case["b"], **options)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-5, atol=1e-5)


def check_fp32(case: dict, *, upstream: float = 3.0, softcap=None, normalizer=None, **options) -> None:
    """Ours and the fp64 reference with the same upstream gradient; every wanted gradient compared."""
    loss = ours(case, softcap=softcap, normalizer=normalizer, **options)
    reduction = "sum" if normalizer is not None else options.get("reduction", "mean")
    norm = None if normalizer is None else float(normalizer)
    ref, leaves = reference(case, reduction=reduction, normalizer=norm, softcap=softcap)
    assert_fp32_close(loss, ref)
    (loss * upstream).backward()
    (ref * upstream).backward()
    for name in ("x", "w", "b"):
        if case[name] is not None and case[name].requires_grad:
            assert case[name].grad.dtype == torch.float32, name
            assert_fp32_close(case[name].grad, leaves[name].grad)


# --- fp32: exact against fp64 autograd ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 8, 37, None], ids=["rows-5", "rows-8", "one-chunk", "default"])
def test_fp32_matches_autograd(path_calls, reduction: str, bias: bool, chunk) -> None:
    # 37 tokens, every 4th ignored (28 labels): chunks of 5 and 8 leave a short last chunk.
    check_fp32(make_inputs((37,), 16, 53, bias=bias), reduction=reduction, chunk_size=chunk)
    assert path_calls == {"forward_grads": 1, "tiled_backward": 0}


@pytest.mark.parametrize("upstream", [1.0, -0.25, 7.5])
def test_upstream_gradient_scales(path_calls, upstream: float) -> None:
    check_fp32(make_inputs((3, 7), 8, 29, bias=True), upstream=upstream, chunk_size=4)
    assert path_calls["forward_grads"] == 1


@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer(path_calls, as_tensor: bool) -> None:
    normalizer = torch.tensor(50.0) if as_tensor else 50.0
    check_fp32(make_inputs((33,), 8, 40, bias=True), normalizer=normalizer, chunk_size=6)
    assert path_calls["forward_grads"] == 1


@pytest.mark.parametrize("bias", [False, True])
def test_softcap(path_calls, bias: bool) -> None:
    check_fp32(make_inputs((21,), 8, 31, bias=bias), softcap=1.5, chunk_size=4)
    assert path_calls["forward_grads"] == 1


def test_custom_ignore_index(path_calls) -> None:
    case = make_inputs((19,), 8, 23, ignore_every=None)
    case["t"][::3] = 5  # a real class id used as the ignore index
    loss = ours(case, ignore_index=5, chunk_size=4)
    keep = case["t"] != 5
    leaves = {k: case[k].detach().double().requires_grad_() for k in ("x", "w")}
    ref = F.cross_entropy((leaves["x"] @ leaves["w"].T)[keep], case["t"][keep])
    assert_fp32_close(loss, ref)
    loss.backward()
    ref.backward()
    assert_fp32_close(case["x"].grad, leaves["x"].grad)
    assert_fp32_close(case["w"].grad, leaves["w"].grad)
    assert path_calls["forward_grads"] == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(path_calls, reduction: str) -> None:
    case = make_inputs((2, 5), 8, 17, bias=True)
    case["t"].fill_(IGNORE)
    loss = ours(case, reduction=reduction, chunk_size=3)
    assert loss.item() == 0.0
    (loss * 2.0).backward()
    for name in ("x", "w", "b"):
        assert torch.equal(case[name].grad, torch.zeros_like(case[name])), name
    assert path_calls["forward_grads"] == 1


@pytest.mark.parametrize("frozen", ["w", "x"])
def test_one_side_frozen(path_calls, monkeypatch, frozen: str) -> None:
    """Only the input's gradient (a frozen head, as under LoRA) or only the head's: the other is not formed."""
    case = make_inputs((23,), 8, 37, bias=True)
    case[frozen].requires_grad_(False)
    case["b"].requires_grad_(False)
    shapes = []
    real_mm = torch.mm

    def mm(a, b, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    check_fp32(case, chunk_size=6)
    monkeypatch.undo()
    assert case[frozen].grad is None and case["b"].grad is None
    # Per chunk: the logits, then dx (G [rows, V] @ W [V, H]) or dW (G^T [V, rows] @ x): never both.
    grads = [s for s in shapes if s[0][1] != 8]  # not the logits matmul (x [rows, 8] @ W^T)
    if frozen == "w":
        assert grads and all(s[1] == (37, 8) for s in grads)
    else:
        assert grads and all(s[0][0] == 37 for s in grads)


def test_gradients_accumulate_into_existing_grad(path_calls) -> None:
    case = make_inputs((17,), 8, 19, bias=True)
    earlier = {k: torch.randn_like(case[k]) for k in ("x", "w", "b")}
    for k in earlier:
        case[k].grad = earlier[k].clone()
    loss = ours(case, chunk_size=5)
    ref, leaves = reference(case, reduction="mean")
    (loss * 2.0).backward()
    (ref * 2.0).backward()
    for k in earlier:
        assert_fp32_close(case[k].grad, earlier[k].double() + leaves[k].grad)


def test_three_d_input_and_non_contiguous(path_calls) -> None:
    case = make_inputs((3, 11), 8, 29)
    x = case["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided [3, 11, 8]
    case["x"] = x
    check_fp32(case, chunk_size=7)
    assert path_calls["forward_grads"] == 1


# --- which path runs ---------------------------------------------------------------------------------------


def test_per_token_loss_no_grad_and_tiles_keep_the_tiled_path(path_calls) -> None:
    case = make_inputs((13,), 8, 31)
    ours(case, reduction="none", chunk_size=4).sum().backward()  # a per-token upstream gradient
    assert path_calls == {"forward_grads": 0, "tiled_backward": 1}
    with torch.no_grad():
        ours(case, chunk_size=4)
    ours(case, chunk_size=(4, 8)).backward()  # vocabulary tiles asked for
    x_frozen = {**case, "x": case["x"].detach(), "w": case["w"].detach()}
    ours(x_frozen, chunk_size=4)  # nothing requires a gradient
    assert path_calls == {"forward_grads": 0, "tiled_backward": 2}


def test_vocabulary_too_wide_for_the_budget_uses_tiles(path_calls) -> None:
    case = make_inputs((40,), 8, 4096)
    # 4096 * 4 bytes per row in fp32: 10 rows fit 160 KiB, under min(40, 16): vocabulary tiles instead.
    assert grad_chunk_rows(40, 4096, 160 << 10, dtype=torch.float32, softcap=False) == 0
    ours(case, memory_budget_bytes=160 << 10).backward()
    assert path_calls == {"forward_grads": 0, "tiled_backward": 1}


def test_grad_chunk_rows() -> None:
    mib = 1 << 20
    # bf16: 2 + 4 bytes per logit; 64 MiB of V = 32768 is 341 rows (the op balances 2048 tokens: 7 x 293).
    assert grad_chunk_rows(2048, 32768, 64 * mib, dtype=BF16, softcap=False) == 341
    assert grad_chunk_rows(512, 65536, 64 * mib, dtype=BF16, softcap=False) == 170
    assert grad_chunk_rows(100, 65536, 1 << 30, dtype=BF16, softcap=False) == 100  # all tokens in one chunk
    # fp32: 4 bytes per logit, softcap 4 more.
    assert grad_chunk_rows(4096, 65536, 16 * mib, dtype=torch.float32, softcap=False) == 64
    assert grad_chunk_rows(4096, 65536, 16 * mib, dtype=torch.float32, softcap=True) == 32
    assert grad_chunk_rows(5, 1000, 4 * 1000 * 4, dtype=torch.float32, softcap=False) == 0  # 4 < min(5, 16)
    assert grad_chunk_rows(3, 1000, 4 * 1000 * 4, dtype=torch.float32, softcap=False) == 3
    with pytest.raises(ValueError, match="positive"):
        grad_chunk_rows(10, 0, 100, dtype=BF16, softcap=False)


# --- memory ------------------------------------------------------------------------------------------------


def test_no_full_logits_and_no_fp32_weight_gradient() -> None:
    n, hidden, vocab = 64, 16, 512  # N * V = 32768 > V * H = 8192 > one chunk of logits (8 * 512)
    case = make_inputs((n,), hidden, vocab, dtype=BF16)
    with MaxNumel() as largest, LargestFloat32() as fp32:
        ours(case, chunk_size=8).backward()
    assert largest.max_numel <= vocab * hidden, largest.shape
    assert fp32.numel <= 8 * vocab, fp32.numel  # one chunk's fp32 logits: no [V, H] fp32 buffer
    assert case["w"].grad.dtype == BF16


# --- bf16: against stock's bf16 path -----------------------------------------------------------------------


def check_bf16(case: dict, *, upstream: float = 3.0, softcap=None, normalizer=None, **options) -> None:
    reduction = "sum" if normalizer is not None else options.get("reduction", "mean")
    loss = ours(case, softcap=softcap, normalizer=normalizer, loss_dtype=torch.float32, **options)
    stock, leaves = stock_bf16(case, reduction=reduction, normalizer=normalizer)
    if softcap is not None:  # stock_bf16 has no softcap: cap its fp32 upcast, as transformers' Gemma does
        stock, leaves = stock_softcap(case, softcap)
    torch.testing.assert_close(loss, stock, rtol=1e-3, atol=1e-6)
    (loss * upstream).backward()
    (stock * upstream).backward()
    for name in ("x", "w", "b"):
        if case[name] is not None:
            assert case[name].grad.dtype == BF16, name
            assert cosine(case[name].grad, leaves[name].grad) > 0.999, name


def stock_softcap(case: dict, softcap: float):
    leaves = {
        k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in case.items() if k != "t"
    }
    logits = leaves["x"] @ leaves["w"].T
    if leaves["b"] is not None:
        logits = logits + leaves["b"]
    capped = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(capped, case["t"], ignore_index=IGNORE), leaves


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 59, None], ids=["rows-7", "rows-16", "one-chunk", "default"])
def test_bf16_matches_stock(path_calls, reduction: str, bias: bool, chunk) -> None:
    check_bf16(make_inputs((59,), 64, 1000, dtype=BF16, bias=bias), reduction=reduction, chunk_size=chunk)
    assert path_calls == {"forward_grads": 1, "tiled_backward": 0}


def test_bf16_options(path_calls) -> None:
    check_bf16(
        make_inputs((45,), 32, 300, dtype=BF16, bias=True), normalizer=61.0, chunk_size=10, upstream=0.5
    )
    check_bf16(make_inputs((45,), 32, 300, dtype=BF16), softcap=4.0, chunk_size=10)
    assert path_calls["forward_grads"] == 2


def test_bf16_one_chunk_is_stocks_arithmetic() -> None:
    """With every label token in one chunk the op is stock's arithmetic: ``dx = G @ W`` from ``G`` rounded once
    is stock's bit for bit, ``dW = G^T x`` differs in a few last bits (0.025 % of entries measured). Over 8
    chunks ``dW`` is rounded to bf16 once per chunk: within 2x stock's error against fp64 (measured 1.58x)."""
    case = make_inputs((256,), 128, 4096, dtype=BF16, ignore_every=None)
    stock, leaves = stock_bf16(case, reduction="mean")
    stock.backward()
    fp64, fp64_leaves = reference(case, reduction="mean")
    fp64.backward()
    ours(case, chunk_size=256).backward()
    assert torch.equal(case["x"].grad, leaves["x"].grad)
    assert (case["w"].grad != leaves["w"].grad).float().mean() < 1e-3
    err_stock = relative(leaves["w"].grad, fp64_leaves["w"].grad)
    case["w"].grad = None
    ours(case, chunk_size=32).backward()
    assert relative(case["w"].grad, fp64_leaves["w"].grad) < 2 * err_stock


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


# --- autograd machinery: checkpointing, retain_graph, torch.compile -----------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant: bool) -> None:
    """The loss inside a checkpointed region: its forward runs again in the backward (reentrant: first
    without grad, then with); the gradients are the same."""
    case = make_inputs((21,), 8, 31, bias=True)
    proj = torch.nn.Linear(8, 8).double()
    proj_ref = torch.nn.Linear(8, 8).double()
    proj_ref.load_state_dict(proj.state_dict())

    def region(x):
        hidden = proj(x.double()).float()
        return linear_cross_entropy(hidden, case["w"], case["t"], bias=case["b"], chunk_size=4)

    loss = checkpoint(region, case["x"], use_reentrant=reentrant)
    (loss * 2.0).backward()
    leaves = {k: case[k].detach().double().requires_grad_() for k in ("x", "w", "b")}
    ref = F.cross_entropy(proj_ref(leaves["x"]) @ leaves["w"].T + leaves["b"], case["t"], ignore_index=IGNORE)
    (ref * 2.0).backward()
    for k in ("x", "w", "b"):
        assert_fp32_close(case[k].grad, leaves[k].grad)
    assert_fp32_close(proj.weight.grad, proj_ref.weight.grad)


def test_retain_graph_second_backward_recomputes(path_calls) -> None:
    case = make_inputs((13,), 8, 17, bias=True)
    loss = ours(case, chunk_size=4) * 2.0
    loss.backward(retain_graph=True)
    loss.backward()
    ref, leaves = reference(case, reduction="mean")
    (ref * 4.0).backward()
    for k in ("x", "w", "b"):
        assert_fp32_close(case[k].grad, leaves[k].grad)
    assert path_calls == {"forward_grads": 1, "tiled_backward": 1}


def compiled_loss(x, w, t, b, normalizer):
    return linear_cross_entropy(
        x, w, t, bias=b, normalizer=normalizer, chunk_size=6, loss_dtype=torch.float32
    )


@pytest.mark.parametrize(
    ("dtype", "frozen", "normalizer"),
    [
        pytest.param(torch.float32, None, None, id="fp32"),
        pytest.param(BF16, "w", torch.tensor(30.0), id="bf16-frozen-head-normalizer"),
        pytest.param(BF16, "x", None, id="bf16-frozen-input"),
    ],
)
def test_compiled_one_graph_equals_eager(path_calls, dtype, frozen, normalizer) -> None:
    cases = [make_inputs((25,), 16, 70, dtype=dtype, bias=True) for _ in range(2)]
    if frozen:
        for case in cases:
            case[frozen].requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_loss, backend="aot_eager", fullgraph=True)  # fullgraph: no break
    losses = []
    for fn, case in zip((compiled_loss, compiled), cases, strict=True):
        loss = fn(case["x"], case["w"], case["t"], case["b"], normalizer)
        (loss * 1.5).backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name in ("x", "w", "b"):
        eager, comp = cases[0][name], cases[1][name]
        assert (comp.grad is None) == (eager.grad is None) == (name == frozen), name
        if eager.grad is not None:
            torch.testing.assert_close(comp.grad, eager.grad, rtol=0, atol=0)
    assert path_calls["forward_grads"] == 2  # eager, and the compiled op's real kernel
