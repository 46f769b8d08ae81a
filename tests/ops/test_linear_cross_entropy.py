"""linear_cross_entropy against an independent reference: F.cross_entropy on explicit fp64 logits + autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from automodel_plugins.ops import choose_chunk_size, default_memory_budget, linear_cross_entropy

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()


# --- helpers ----------------------------------------------------------------------------------------------


def make_inputs(
    lead: tuple[int, ...],
    hidden: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    ignore_every: int | None = 4,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Leaf tensors for one case; weights scaled so the softmax is neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * (2.0 / math.sqrt(hidden))
    b = torch.randn(vocab, generator=gen) if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    if ignore_every:
        t.view(-1)[::ignore_every] = IGNORE
    to = {"dtype": dtype, "device": device}
    return {
        "x": x.to(**to).requires_grad_(),
        "w": w.to(**to).requires_grad_(),
        "b": None if b is None else b.to(**to).requires_grad_(),
        "t": t.to(device),
    }


def reference(case: dict, *, reduction: str, normalizer: float | None = None, softcap: float | None = None):
    """Loss from explicit fp64 logits and fresh fp64 leaves (so its grads are independent of ours)."""
    leaves = {
        k: (None if v is None else v.detach().double().requires_grad_()) for k, v in case.items() if k != "t"
    }
    logits = leaves["x"] @ leaves["w"].T
    if leaves["b"] is not None:
        logits = logits + leaves["b"]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = logits.reshape(-1, logits.shape[-1])
    if normalizer is not None:
        loss = F.cross_entropy(flat, case["t"].reshape(-1), ignore_index=IGNORE, reduction="sum") / normalizer
    else:
        loss = F.cross_entropy(flat, case["t"].reshape(-1), ignore_index=IGNORE, reduction=reduction)
        if reduction == "none":
            loss = loss.reshape(case["t"].shape)
    return loss, leaves


def backward_with(loss: torch.Tensor, seed: int = 1) -> None:
    """Backward with grad_output != 1: loss * 3 for scalars, a fixed random weighting for per-token losses."""
    if loss.dim() == 0:
        (loss * 3.0).backward()
    else:
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
        (loss * weights.to(loss.device, loss.dtype)).sum().backward()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: tight; bf16/fp16: inputs are exact in both, only the final cast rounds, so ~1% of the scale."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    else:
        scale = expected.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(actual, expected, rtol=1.6e-2, atol=1e-2 * float(scale))


def check_case(
    case: dict,
    *,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = 5,
) -> torch.Tensor:
    """Run ours and the reference with the same grad_output; compare loss and every gradient."""
    dtype = case["x"].dtype
    ours = linear_cross_entropy(
        case["x"],
        case["w"],
        case["t"],
        bias=case["b"],
        reduction=reduction,
        normalizer=normalizer,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    assert ours.dtype == dtype
    norm = None if normalizer is None else float(normalizer)
    ref, leaves = reference(case, reduction=reduction, normalizer=norm, softcap=softcap)
    assert_close(ours, ref, dtype)
    backward_with(ours)
    backward_with(ref)
    for name in ("x", "w", "b"):
        if case[name] is not None:
            assert case[name].grad is not None, name
            assert case[name].grad.dtype == dtype
            assert_close(case[name].grad, leaves[name].grad, dtype)
    return ours


class MaxNumel(TorchDispatchMode):
    """Records the largest fresh allocation (in elements) of any aten op, forward and backward.

    Views and ``out=`` results share an argument's storage and are not counted; anything else is new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        arg_storages = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in arg_storages:
                numel = t.untyped_storage().nbytes() // t.element_size()
                if numel > self.max_numel:
                    self.max_numel, self.shape = numel, tuple(t.shape)
        return out


# --- correctness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, (5, 16)], ids=["rows", "rows+vocab-tiles"])
def test_matches_reference(
    dtype: torch.dtype, reduction: str, bias: bool, chunk: int | tuple[int, int]
) -> None:
    # N = 23 and V = 37 are not multiples of the 5-row chunk or 16-wide tile; every 4th target is ignored.
    check_case(make_inputs((23,), 16, 37, dtype=dtype, bias=bias), reduction=reduction, chunk_size=chunk)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_three_d_input(reduction: str) -> None:
    case = make_inputs((3, 7), 12, 29, bias=True)
    out = check_case(case, reduction=reduction, chunk_size=4)
    assert out.shape == (() if reduction != "none" else (3, 7))
    assert case["x"].grad.shape == (3, 7, 12)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64, None, (4, 7), (8, 40), (19, 1), (64, 64)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_sizes(chunk_size: int | tuple[int, int] | None, reduction: str) -> None:
    # 19 tokens and V = 41: neither is a multiple of any chunk or vocabulary tile here.
    check_case(make_inputs((19,), 8, 41, bias=True), reduction=reduction, chunk_size=chunk_size)


def test_non_contiguous_input() -> None:
    case = make_inputs((5, 4), 8, 21)
    x_t = case["x"].detach().transpose(0, 1).contiguous().requires_grad_()  # [4, 5, H]
    ours = linear_cross_entropy(x_t.transpose(0, 1), case["w"], case["t"], chunk_size=3)
    ref, leaves = reference(case, reduction="mean")
    assert_close(ours, ref, torch.float32)
    ours.backward()
    ref.backward()
    assert_close(x_t.grad.transpose(0, 1), leaves["x"].grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_token(dtype: torch.dtype) -> None:
    check_case(make_inputs((1,), 8, 13, dtype=dtype, bias=True, ignore_every=None), chunk_size=None)


def test_unbatched_input_and_scalar_target() -> None:
    case = make_inputs((1,), 8, 13, ignore_every=None)
    x = case["x"].detach()[0].requires_grad_()
    ours = linear_cross_entropy(x, case["w"], case["t"][0], reduction="none")
    assert ours.shape == ()
    ref, _ = reference(case, reduction="none")
    assert_close(ours, ref[0], torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction: str, bias: bool) -> None:
    case = make_inputs((2, 5), 8, 11, bias=bias)
    case["t"].fill_(IGNORE)
    out = linear_cross_entropy(case["x"], case["w"], case["t"], bias=case["b"], reduction=reduction)
    assert torch.isfinite(out).all()
    assert (out == 0).all()
    backward_with(out)
    for name in ("x", "w", "b"):
        if case[name] is not None:
            assert torch.equal(case[name].grad, torch.zeros_like(case[name]))
    # PyTorch's mean of nothing is NaN; the op returns 0 on purpose (as trainers do).
    if reduction == "mean":
        assert F.cross_entropy(torch.zeros(10, 11), case["t"].reshape(-1)).isnan()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer_divides_the_sum(reduction: str, as_tensor: bool) -> None:
    normalizer = torch.tensor(40.0) if as_tensor else 40
    check_case(make_inputs((23,), 8, 19, bias=True), reduction=reduction, normalizer=normalizer)


def test_zero_normalizer_with_no_labels_gives_zero() -> None:
    case = make_inputs((6,), 8, 11)
    case["t"].fill_(IGNORE)
    out = linear_cross_entropy(case["x"], case["w"], case["t"], reduction="sum", normalizer=torch.tensor(0))
    out.backward()
    assert out.item() == 0.0
    assert not case["x"].grad.any() and not case["w"].grad.any()


def test_normalizer_sums_over_micro_batches() -> None:
    """Gradient accumulation: per-micro-batch losses with the global label count add up to the full mean."""
    case = make_inputs((30,), 8, 17)
    labels = int((case["t"] != IGNORE).sum())
    total = sum(
        linear_cross_entropy(case["x"][s], case["w"], case["t"][s], normalizer=labels, chunk_size=4)
        for s in (slice(0, 11), slice(11, 30))
    )
    total.backward()
    ref, leaves = reference(case, reduction="mean")
    ref.backward()
    assert_close(total, ref, torch.float32)
    assert_close(case["w"].grad, leaves["w"].grad, torch.float32)
    assert_close(case["x"].grad, leaves["x"].grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [5, (5, 9), None])
def test_softcap(reduction: str, dtype: torch.dtype, chunk: int | tuple[int, int] | None) -> None:
    # A small cap so tanh saturates for some logits and the cap's derivative matters.
    case = make_inputs((17,), 8, 23, dtype=dtype, bias=True)
    check_case(case, reduction=reduction, softcap=1.5, chunk_size=chunk)


def test_custom_ignore_index_and_int32_target() -> None:
    case = make_inputs((15,), 8, 19, ignore_every=None)
    t = case["t"].clone()
    t[::3] = 7  # class 7 used as the ignore index here
    ours = linear_cross_entropy(case["x"], case["w"], t.int(), ignore_index=7, chunk_size=4)
    logits = case["x"].detach().double() @ case["w"].detach().double().T
    assert_close(ours, F.cross_entropy(logits, t, ignore_index=7), torch.float32)


def test_frozen_weight_and_no_grad() -> None:
    case = make_inputs((11,), 8, 13)
    case["w"].requires_grad_(False)
    out = linear_cross_entropy(case["x"], case["w"], case["t"], chunk_size=4)
    out.backward()
    assert case["w"].grad is None
    ref, leaves = reference(case, reduction="mean")
    ref.backward()
    assert_close(case["x"].grad, leaves["x"].grad, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(case["x"], case["w"], case["t"], reduction="none", chunk_size=4)
    assert not loss.requires_grad
    assert_close(loss, reference(case, reduction="none")[0], torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_second_backward_accumulates(reduction: str) -> None:
    case = make_inputs((13,), 8, 17, bias=True)
    out = linear_cross_entropy(
        case["x"], case["w"], case["t"], bias=case["b"], reduction=reduction, chunk_size=4
    )
    loss = out.sum() * 2.0
    loss.backward(retain_graph=True)
    loss.backward()  # precomputed gradients were consumed; this one recomputes
    ref, leaves = reference(case, reduction=reduction)
    (ref.sum() * 4.0).backward()
    for name in ("x", "w", "b"):
        assert_close(case[name].grad, leaves[name].grad, torch.float32)


# --- memory: never an [N, V] tensor -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk", [8, (32, 24)])
def test_no_full_logits_allocated(reduction: str, chunk: int | tuple[int, int]) -> None:
    n, hidden, vocab = 64, 16, 96  # N*V = 6144 > V*H = 1536 (the weight grad) > one chunk of logits
    case = make_inputs((n,), hidden, vocab)
    with MaxNumel() as mode:
        out = linear_cross_entropy(case["x"], case["w"], case["t"], reduction=reduction, chunk_size=chunk)
        out.sum().backward()
    assert mode.max_numel <= vocab * hidden, mode.shape
    # The same probe does see the naive path's logits, so the assertion above can fail.
    with MaxNumel() as naive:
        F.cross_entropy(case["x"] @ case["w"].T, case["t"]).backward()
    assert naive.max_numel >= n * vocab


def test_low_precision_head_is_upcast_per_tile() -> None:
    n, hidden, vocab = 64, 16, 96
    case = make_inputs((n,), hidden, vocab, dtype=torch.bfloat16)
    with torch.no_grad(), MaxNumel() as mode:
        loss = linear_cross_entropy(case["x"], case["w"], case["t"], chunk_size=(32, 24))
    assert mode.max_numel == 32 * 24  # the logits tile; never an fp32 copy of the whole [V, H] weight
    assert_close(loss, reference(case, reduction="mean")[0], torch.bfloat16)


def test_no_full_logits_saved_for_backward() -> None:
    n, hidden, vocab = 64, 16, 96
    case = make_inputs((n,), hidden, vocab)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(case["x"], case["w"], case["t"], reduction="none", chunk_size=8).sum().backward()
        ours = list(saved)
        saved.clear()
        F.cross_entropy(case["x"] @ case["w"].T, case["t"]).backward()
    assert ours and max(ours) < n * vocab
    assert n * vocab in saved  # the naive path saves its log-probabilities


@pytest.mark.parametrize("budget_rows", [4, 8, 64])
def test_memory_budget_sets_the_chunk(budget_rows: int) -> None:
    n, hidden, vocab = 64, 4, 1000  # without grads the chunk's logits tile is the largest allocation
    case = make_inputs((n,), hidden, vocab)
    budget = budget_rows * vocab * 4
    rows, tile = choose_chunk_size(n, vocab, budget, hidden=hidden)
    assert rows * (tile + 2 * hidden) * 4 <= budget
    with torch.no_grad(), MaxNumel() as mode:
        loss = linear_cross_entropy(case["x"], case["w"], case["t"], memory_budget_bytes=budget)
    assert mode.max_numel == rows * tile
    assert_close(loss, reference(case, reduction="mean")[0], torch.float32)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_budget_chosen_tiles_match_reference(reduction: str) -> None:
    case = make_inputs((2, 40), 8, 1000, bias=True)
    budget = 20 * (256 + 2 * 8) * 4  # 20 rows of a 256-wide tile: four tiles, the last one partial
    assert choose_chunk_size(80, 1000, budget, hidden=8) == (16, 256)
    ours = linear_cross_entropy(
        case["x"], case["w"], case["t"], bias=case["b"], reduction=reduction, memory_budget_bytes=budget
    )
    ref, leaves = reference(case, reduction=reduction)
    assert_close(ours, ref, torch.float32)
    backward_with(ours)
    backward_with(ref)
    for name in ("x", "w", "b"):
        assert_close(case[name].grad, leaves[name].grad, torch.float32)


def test_choose_chunk_size() -> None:
    mib = 1 << 20
    # The benchmark shape: 64 rows of the whole vocabulary would fit; too few, so 1024 rows x 2048-wide tiles.
    assert choose_chunk_size(4096, 65536, 16 * mib, hidden=1024) == (1024, 2048)
    assert choose_chunk_size(4096, 65536, 16 * mib, hidden=1024, logit_buffers=2) == (1024, 1024)
    # A bf16 head adds an fp32 copy of each weight tile to the working set.
    assert choose_chunk_size(4096, 65536, 16 * mib, hidden=1024, weight_tile_copy=True) == (1024, 1024)
    assert choose_chunk_size(4096, 131072, 64 * mib, hidden=5120, weight_tile_copy=True) == (1024, 1024)
    # Enough rows of the whole vocabulary fit: one pass, rows rounded down to a multiple of 16.
    assert choose_chunk_size(4096, 32000, 64 * mib, hidden=4096) == (416, 32000)
    assert choose_chunk_size(100, 50, 4 * mib, hidden=16) == (100, 50)  # never more rows than tokens
    assert choose_chunk_size(10, 1000, 10 * 1000 * 4) == (10, 1000)  # few tokens: one pass even if few rows
    # Tiny budgets still make progress: tiles of at least 256 (or the vocabulary), at least 1 row.
    assert choose_chunk_size(4096, 65536, 1) == (1, 256)
    assert choose_chunk_size(4096, 200, 4000) == (5, 200)
    assert default_memory_budget(65536, 1024) == 16 * mib  # 1/16 of the 256 MiB weight gradient
    assert default_memory_budget(256000, 8192) == 64 * mib
    assert default_memory_budget(100, 10) == 4 * mib
    with pytest.raises(ValueError, match="positive"):
        choose_chunk_size(10, 0, 100)


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_loss_of_a_bf16_head_is_not_rounded_to_bf16(reduction: str) -> None:
    """``loss_dtype=torch.float32``: the fp32 loss the op computes anyway, not its bf16 rounding."""
    case = make_inputs((4, 16), 32, 300, dtype=torch.bfloat16)
    ours = linear_cross_entropy(
        case["x"], case["w"], case["t"], reduction=reduction, chunk_size=(16, 128), loss_dtype=torch.float32
    )
    assert ours.dtype == torch.float32
    # The head's matmul runs in bf16 (fp32 accumulation, bf16 logits) as stock's ``lm_head`` does, so the
    # unrounded loss to expect is stock's: bf16 logits, then fp32 cross-entropy (transformers' upcast).
    logits = (case["x"].detach() @ case["w"].detach().T).float().reshape(-1, 300)
    stock = F.cross_entropy(logits, case["t"].reshape(-1), reduction=reduction).reshape(ours.shape)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    ref, leaves = reference(case, reduction=reduction)  # fp64 logits of the same (bf16-exact) inputs
    rounded = linear_cross_entropy(case["x"], case["w"], case["t"], reduction=reduction, chunk_size=(16, 128))
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.double(), ours.double())
    backward_with(ours)
    backward_with(ref)
    for name in ("x", "w"):
        assert case[name].grad.dtype == torch.bfloat16
        assert_close(case[name].grad, leaves[name].grad, torch.bfloat16)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"w": torch.zeros(9, 7)}, ValueError, "hidden size mismatch"),
        ({"t": torch.zeros(5, dtype=torch.long)}, ValueError, "token count mismatch"),
        ({"t": torch.zeros(6)}, TypeError, "integer class indices"),
        ({"t": torch.zeros(6, dtype=torch.bool)}, TypeError, "integer class indices"),
        ({"w": torch.zeros(9, 8, dtype=torch.float64)}, TypeError, "weight dtype"),
        ({"x": torch.zeros(6, 8, dtype=torch.long)}, TypeError, "floating-point"),
        ({"w": torch.zeros(9, 8, 1)}, ValueError, r"weight must be \[V, H\]"),
        ({"b": torch.zeros(8)}, ValueError, "bias must be"),
        ({"t": torch.full((6,), 9)}, ValueError, "out of range"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"reduction": "none", "normalizer": 3}, ValueError, "normalizer"),
        ({"normalizer": -1}, ValueError, "non-negative finite"),
        ({"normalizer": float("nan")}, ValueError, "non-negative finite"),
        ({"normalizer": 0}, ValueError, "normalizer is 0 but the batch has 6 label tokens"),
        ({"normalizer": torch.tensor([1.0, 2.0])}, ValueError, "one value"),
        ({"normalizer": "3"}, TypeError, "normalizer must be"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": (4, 0)}, ValueError, "chunk_size"),
        ({"chunk_size": True}, ValueError, "chunk_size"),
        ({"memory_budget_bytes": -5}, ValueError, "memory_budget_bytes"),
        ({"chunk_size": 4, "memory_budget_bytes": 1024}, ValueError, "not both"),
        ({"loss_dtype": torch.int64}, TypeError, "loss_dtype"),
        ({"loss_dtype": "float32"}, TypeError, "loss_dtype"),
    ],
)
def test_validation_errors(change: dict, error: type, match: str) -> None:
    args = {"x": torch.zeros(6, 8), "w": torch.zeros(9, 8), "t": torch.zeros(6, dtype=torch.long), "b": None}
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args["x"], args["w"], args["t"], bias=args["b"], **options)


# --- CUDA (the same checks, skipped cleanly without a device) ---------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_matches_reference(self, dtype: torch.dtype, reduction: str) -> None:
        case = make_inputs((4, 23), 32, 301, dtype=dtype, bias=True, device="cuda")
        check_case(case, reduction=reduction, chunk_size=16)

    def test_normalizer_and_softcap(self) -> None:
        case = make_inputs((45,), 16, 77, bias=True, device="cuda")
        check_case(case, reduction="sum", normalizer=torch.tensor(50.0, device="cuda"), softcap=2.0)

    def test_all_ignored(self) -> None:
        case = make_inputs((9,), 16, 33, device="cuda")
        case["t"].fill_(IGNORE)
        out = linear_cross_entropy(case["x"], case["w"], case["t"])
        out.backward()
        assert out.item() == 0.0
        assert not case["x"].grad.any() and not case["w"].grad.any()

    def test_no_full_logits_allocated(self) -> None:
        n, hidden, vocab = 256, 16, 512
        case = make_inputs((n,), hidden, vocab, device="cuda")
        with MaxNumel() as mode:
            linear_cross_entropy(case["x"], case["w"], case["t"], chunk_size=32).backward()
        assert mode.max_numel <= vocab * hidden
