"""Graph breaks of ``torch.compile`` (dynamo) on a tiny FP8-resident Mistral3 + PEFT LoRA loss forward.

Builds the test kit's tiny Mistral3 (2 text layers, 14 FP8 linears; ``--kind block``: 32x32 block scales) as an
FP8 checkpoint in a temporary directory, loads it with ``dequantize=False``, wraps q/k/v/o/gate/up/down in LoRA
(r=4), then ``torch._dynamo.explain`` on its very first call, a labelled batch (text only; ``--image`` adds an
image, whose Pixtral tower breaks in stock transformers code). Prints the graph and break counts, the breaks
whose stack passes through the FP8 code (``automodel_plugins/fp8/``, ``model/fp8_*``) and through the rotary
repair (``model/rotary.py``), and every break by place. ``--compare BACKEND`` then runs one step (loss + backward) of a
deep copy compiled with that backend against the eager step and prints the loss difference and the largest
LoRA-gradient difference (relative to each gradient's largest value). Not a timing.

    python benchmarks/bench_compile_fp8.py [--kind block] [--skip-logits] [--image] [--compare inductor]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

FP8_CODE = ("automodel_plugins/fp8/", "automodel_plugins/model/fp8_")
ROTARY = "automodel_plugins/model/rotary.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="per-tensor", choices=("per-tensor", "block"))
    parser.add_argument("--skip-logits", action="store_true", help="load with skip_logits=True")
    parser.add_argument("--image", action="store_true", help="an image in the batch")
    parser.add_argument("--compare", metavar="BACKEND", help="compiled (inductor, aot_eager) vs eager step")
    args = parser.parse_args()

    import peft
    import torch
    from transformers import Mistral3ForConditionalGeneration

    import automodel_plugins
    from automodel_plugins.registry import Registry
    from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
    from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

    torch.manual_seed(0)
    config = tiny_mistral3_config()
    with tempfile.TemporaryDirectory() as directory:
        path = write_fp8_checkpoint(
            Mistral3ForConditionalGeneration(config),
            Path(directory),
            block_size=(32, 32) if args.kind == "block" else None,
        )
        model = automodel_plugins.from_pretrained(
            path,
            dtype=torch.float32,
            dequantize=False,
            skip_logits=args.skip_logits,
            registry=Registry.from_entry_points("mistral3_fp8"),
            progress=False,
        )
    torch.manual_seed(1)
    lora = peft.LoraConfig(
        r=4,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(model, lora)
    batch = mistral3_image_batch(config, batch=2, seq=15, image_rows=1 if args.image else 0)
    if not args.image:
        batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    explanation = torch._dynamo.explain(model)(**batch)  # the first call: no eager call before it
    places: collections.Counter[str] = collections.Counter()
    in_fp8 = in_rotary = 0
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = "?" if frame is None else f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
        places[f"{reason.reason.splitlines()[0][:80]} at {where.split('automodel_plugins/', 1)[-1]}"] += 1
        in_fp8 += any(any(p in f.filename for p in FP8_CODE) for f in reason.user_stack)
        in_rotary += any(ROTARY in f.filename for f in reason.user_stack)
    print(
        f"kind={args.kind} skip_logits={args.skip_logits} image={args.image}: "
        f"graphs {explanation.graph_count}, breaks {explanation.graph_break_count}, in the FP8 code {in_fp8}, "
        f"in the rotary repair {in_rotary}"
    )
    for place, count in places.most_common():
        print(f"  {count:3d}  {place}")
    if args.compare:
        compare(model, batch, args.compare)


def compare(model, batch, backend: str) -> None:  # type: ignore[no-untyped-def]
    import copy

    import torch

    compiled_model = copy.deepcopy(model)
    model.zero_grad()
    expected = model(**batch).loss
    expected.backward()
    loss = torch.compile(compiled_model, backend=backend)(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    worst = max(((got[n] - g).abs().max() / g.abs().max()).item() for n, g in grads.items())
    equal = sum(torch.equal(got[n], g) for n, g in grads.items())
    print(
        f"{backend} vs eager: loss {loss.item():.9g} vs {expected.item():.9g} (diff {(loss - expected).abs().item():.3g}); "
        f"{len(grads)} gradients, {equal} bit-equal, largest difference {worst:.3g} of the gradient's largest value"
    )


if __name__ == "__main__":
    main()
