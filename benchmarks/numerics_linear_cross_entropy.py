"""How far the fused loss is from stock in BF16, over shapes and options: the issue-24 numerics bar, measured.

For each case, three computations on the same bf16 leaves: ours (``linear_cross_entropy``), stock (``x @ W.T``
in bf16, bias in the same matmul, softcap on the fp32 upcast, ``cross_entropy(logits.float())``, autograd) and
an fp64 reference (fp64 logits of the same bf16 values). Printed per case: the loss's relative error against
stock, each gradient's cosine with stock's, and each gradient's relative error (``|g - ref| / |ref|``, Frobenius)
against the fp64 reference for ours and for stock. The bar: loss within 1e-3 of stock, cosine > 0.999.

Also printed for the input gradient: the error of one rounding at the end (``G @ W`` over the whole vocabulary
with fp32 accumulation, from the same bf16 ``G``), what an fp32 sum of fp32 tile products would give, against
ours (each tile's bf16 ``G @ W_tile`` rounded to bf16, then summed in fp32).

    python benchmarks/numerics_linear_cross_entropy.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from automodel_plugins.ops import linear_cross_entropy

IGNORE = -100
BF16 = torch.bfloat16


@dataclass(frozen=True)
class Case:
    n: int
    hidden: int
    vocab: int
    ignored: float = 1 / 7  # fraction of targets ignored
    reduction: str = "mean"
    bias: bool = False
    softcap: float | None = None
    normalizer: float | None = None
    chunk: tuple[int, int] | None = None
    logit_std: float = 2.0  # spread of the logits (a trained head's are peakier than a random one's)

    def label(self) -> str:
        parts = [f"N={self.n} H={self.hidden} V={self.vocab}", f"ign={self.ignored:.2f}", self.reduction]
        parts += ["bias"] * self.bias + [f"softcap={self.softcap}"] * (self.softcap is not None)
        parts += [f"norm={self.normalizer}"] * (self.normalizer is not None)
        parts += [f"chunk={self.chunk}"] * (self.chunk is not None) + [f"std={self.logit_std}"]
        return " ".join(parts)


def leaves(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.hidden, generator=gen)
    w = torch.randn(case.vocab, case.hidden, generator=gen) * (case.logit_std / math.sqrt(case.hidden))
    b = torch.randn(case.vocab, generator=gen) if case.bias else None
    t = torch.randint(0, case.vocab, (case.n,), generator=gen)
    t[torch.rand(case.n, generator=gen) < case.ignored] = IGNORE
    return {"x": x.to(BF16), "w": w.to(BF16), "b": None if b is None else b.to(BF16), "t": t}


def fresh(tensors: dict, dtype: torch.dtype | None = None) -> dict:
    return {
        k: (v if k == "t" or v is None else v.detach().to(dtype or v.dtype).clone().requires_grad_())
        for k, v in tensors.items()
    }


def stock_loss(case: Case, p: dict) -> torch.Tensor:
    x, w, b = p["x"], p["w"], p["b"]
    logits = x @ w.T if b is None else torch.addmm(b, x, w.T)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    if case.normalizer is not None:
        return F.cross_entropy(logits, p["t"], ignore_index=IGNORE, reduction="sum") / case.normalizer
    return F.cross_entropy(logits, p["t"], ignore_index=IGNORE, reduction=case.reduction)


def backward(loss: torch.Tensor) -> None:
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype) if loss.dim() else 3.0
    (loss * weights).sum().backward()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300))


def one_rounding_dx(case: Case, p: dict, stock_logits_grad: torch.Tensor) -> torch.Tensor:
    """``(G @ W)`` with fp32 accumulation and one rounding, from stock's bf16 logits gradient ``G``."""
    return (stock_logits_grad.float() @ p["w"].detach().float()).to(BF16)


def measure(case: Case) -> dict[str, float]:
    base = leaves(case)
    ours_p, stock_p, ref_p = fresh(base), fresh(base), fresh(base, torch.float64)
    start = time.perf_counter()
    ours = linear_cross_entropy(
        ours_p["x"],
        ours_p["w"],
        ours_p["t"],
        bias=ours_p["b"],
        reduction=case.reduction,
        normalizer=case.normalizer,
        softcap=case.softcap,
        chunk_size=case.chunk,
        loss_dtype=torch.float32,
    )
    backward(ours)
    seconds = time.perf_counter() - start
    logits_grad: list[torch.Tensor] = []
    x, w, b = stock_p["x"], stock_p["w"], stock_p["b"]
    raw = x @ w.T if b is None else torch.addmm(b, x, w.T)
    raw.register_hook(lambda g: logits_grad.append(g))
    logits = raw.float()
    if case.softcap is not None:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    if case.normalizer is not None:
        stock = F.cross_entropy(logits, stock_p["t"], ignore_index=IGNORE, reduction="sum") / case.normalizer
    else:
        stock = F.cross_entropy(logits, stock_p["t"], ignore_index=IGNORE, reduction=case.reduction)
    backward(stock)
    ref = stock_loss(case, ref_p)
    backward(ref)
    row = {"loss_rel": rel(ours.detach(), stock.detach()), "seconds": seconds}
    for name in ("x", "w", "b"):
        if base[name] is None:
            continue
        g, s, r = ours_p[name].grad, stock_p[name].grad, ref_p[name].grad
        row[f"d{name}_cos"] = cosine(g, s)
        row[f"d{name}_err_ours"] = rel(g, r)
        row[f"d{name}_err_stock"] = rel(s, r)
    row["dx_err_one_rounding"] = rel(one_rounding_dx(case, stock_p, logits_grad[0]), ref_p["x"].grad)
    return row


def cases(quick: bool) -> list[Case]:
    mid = Case(512, 256, 32768)
    out = [
        Case(1, 64, 1000, ignored=0.0),
        Case(59, 64, 1000),
        Case(59, 64, 1000, chunk=(16, 128)),
        mid,
        Case(512, 256, 32768, ignored=0.0),
        Case(512, 256, 32768, ignored=0.9),
        Case(512, 256, 32768, reduction="sum"),
        Case(512, 256, 32768, reduction="none"),
        Case(512, 256, 32768, normalizer=2048.0),
        Case(512, 256, 32768, bias=True),
        Case(512, 256, 32768, softcap=30.0, logit_std=20.0),
        Case(512, 256, 32768, logit_std=8.0),
        Case(512, 256, 32768, chunk=(128, 1024)),
        Case(512, 256, 32768, chunk=(512, 32768)),
        Case(512, 256, 32768, chunk=(64, 32768)),
        Case(2048, 256, 32768, chunk=(64, 32768)),
    ]
    if not quick:
        out += [Case(2048, 256, 32768), Case(512, 1024, 65536), Case(2048, 1024, 65536)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="skip the large shapes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    worst = {"loss_rel": 0.0, "cos": 1.0}
    for case in cases(args.quick):
        row = measure(case)
        worst["loss_rel"] = max(worst["loss_rel"], row["loss_rel"])
        worst["cos"] = min([worst["cos"]] + [v for k, v in row.items() if k.endswith("_cos")])
        cells = [f"1-{k}={1 - v:.1e}" if k.endswith("_cos") else f"{k}={v:.3g}" for k, v in row.items()]
        print(f"{case.label()}\n    " + " ".join(cells), flush=True)
    print(
        f"worst: loss rel {worst['loss_rel']:.3g} (bar 1e-3), gradient cosine {worst['cos']:.6f} (bar 0.999)"
    )


if __name__ == "__main__":
    main()
