"""Loading a per-expert FP8 Qwen3-VL-MoE checkpoint: ``automodel_plugins.from_pretrained`` vs transformers.

Both load the same ~0.31B-parameter checkpoint (``benchmarks/_checkpoint.py``: 4 layers of 24 experts, one
128x128-block FP8 tensor per expert and projection, the FP8 releases' form) into the stock
``Qwen3VLMoeForConditionalGeneration`` in BF16 on CPU. transformers 5.24 cannot load this form by itself (its
qwen3_vl_moe mapping has no per-expert rule: the experts stay at their random init, with a load report and no
error), so the peer is transformers with the per-expert conversion it uses for qwen2_moe registered for
qwen3_vl_moe (``MergeModulelist`` + ``Concatenate``; its FP8 quantizer then dequantizes each expert tensor before
merging): the same file, the same result bit for bit, which the driver checks. Method, memory accounting and
checks as ``bench_load.py`` (fresh processes, alternating, medians; peak = ``VmHWM`` over the baseline).

The peak's floor is the bytes of the tensors a dequantizing load must hold in anonymous memory (everything that
was FP8 on disk, now BF16); BF16 tensors used in place from the memory map count only once touched. A MoE's
experts are most of its parameters, so that floor, printed below, decides whether peak / BF16 params can be
under 0.75; "overhead" is the peak over that floor.

``resident`` is a third loader measured in the same run: ``from_pretrained(path, dequantize=False)``, which keeps
the experts FP8 (``Fp8Experts``: every piece is 128x128-block FP8 on block boundaries) and the attention
projections FP8 (``Fp8Linear``): its floor is the FP8 codes and scales plus the BF16 rest, and its peak is
compared with the dequantizing load's.

Targets: peak / BF16 parameter bytes <= 0.75 and <= transformers'; wall time ours / transformers <= 1.0;
resident: peak / BF16 parameter bytes <= 0.60, every FP8 tensor kept FP8.

    python benchmarks/bench_moe_load.py             # 3 processes per loader
    python benchmarks/bench_moe_load.py --repeats 5 [--path DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRss
from bench_load import LOADERS, PEAK_TARGET, loaded_facts, measure, report

RESIDENT = "resident"
RESIDENT_PEAK_TARGET = 0.60


def worker(loader: str, path: str) -> dict:
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration
    from transformers.utils import logging

    import automodel_plugins
    import automodel_plugins.pipeline.load.load  # imported before the baseline, by both loaders
    from automodel_plugins.testing.stock_conversions import stock_per_expert_conversion

    logging.set_verbosity_error()
    stock_rules = stock_per_expert_conversion() if loader == "transformers" else contextlib.nullcontext()
    with stock_rules, PeakRss() as peak:
        wall, cpu = time.perf_counter(), time.process_time()
        if loader in ("ours", RESIDENT):
            model = automodel_plugins.from_pretrained(
                path, dtype=torch.bfloat16, progress=False, dequantize=loader == "ours"
            )
        else:
            model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    facts = loaded_facts(loader, model, peak, wall, cpu)
    if loader == RESIDENT:
        composition = model.automodel_composition
        facts["fp8_not_resident"] = len(composition.fp8_not_resident)
        facts["resident_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return facts


def dequantized_bytes(path: Path) -> int:
    """The floor: BF16 bytes of every model tensor whose data is FP8 on disk (experts and attention)."""
    import torch

    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.model.stock import build_on_meta
    from automodel_plugins.model.tensors import model_tensors
    from automodel_plugins.pipeline.composition import adapter_for
    from automodel_plugins.pipeline.load.plan import plan_load
    from automodel_plugins.registry import get_registry
    from automodel_plugins.sources import load_config

    config = load_config(path)
    registry = get_registry()
    model = build_on_meta(config, torch.bfloat16)
    with Checkpoint.open(path) as checkpoint:
        plan = plan_load(
            model_tensors(model),
            adapter_for(registry, registry.resolve(config), config, checkpoint),
            checkpoint,
        )
    return sum(p.numel * 2 for p in plan.values() if p.action == "dequantized")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="processes per loader (median)")
    parser.add_argument("--path", type=Path, help="an existing checkpoint instead of the generated one")
    parser.add_argument("--worker", choices=(*LOADERS, RESIDENT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.path))))
        return 0

    from _checkpoint import bf16_parameter_bytes, ensure_moe_checkpoint

    path = args.path or ensure_moe_checkpoint()
    results, load_average = measure(path, args.repeats, __file__, loaders=(*LOADERS, RESIDENT))
    resident = results.pop(RESIDENT)
    floor = dequantized_bytes(path) / bf16_parameter_bytes(path)
    peak = statistics.median(r["peak_bytes"] for r in results["ours"]) / bf16_parameter_bytes(path)
    resident_peak = statistics.median(r["peak_bytes"] for r in resident) / bf16_parameter_bytes(path)
    resident_held = resident[0]["resident_bytes"] / bf16_parameter_bytes(path)
    print(
        f"resident (dequantize=False): peak / BF16 params {resident_peak:.3f} (wall "
        f"{statistics.median(r['wall_s'] for r in resident):.2f} s; the model holds {resident_held:.3f} of the "
        f"BF16 parameter bytes; {resident[0]['fp8_not_resident']} FP8 tensor(s) not resident); "
        f"resident / dequantized peak {resident_peak / peak:.3f}"
    )
    print(
        f"\nfloor: the FP8-on-disk tensors held in BF16 are {floor:.3f} of the BF16 parameter bytes; "
        f"ours peaks at {peak / floor:.3f}x that (target {PEAK_TARGET} needs a floor below it)"
    )
    print("peer: transformers with the per-expert conversion registered (it reads this form bit-identically)")
    report(
        results,
        path,
        args.repeats,
        load_average,
        extra_checks=[
            (
                f"peak over the floor (ours)             {peak / floor:6.3f}  (target <= 1.10)",
                peak / floor <= 1.10,
            ),
            (
                f"peak / BF16 params (resident)          {resident_peak:6.3f}  (target <= {RESIDENT_PEAK_TARGET})",
                resident_peak <= RESIDENT_PEAK_TARGET,
            ),
            (
                f"FP8 tensors not resident (resident)    {resident[0]['fp8_not_resident']:6d}  (target 0)",
                all(r["fp8_not_resident"] == 0 and not r["bad_tensors"] for r in resident),
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
