"""TRL's ``SFTTrainer`` and this project's fused loss (issue 21 item 4).

Stock ``trl.SFTTrainer`` (TRL 1.x) trains through ``model(**batch, fused_lm_head=True)``, its own chunked head:
this project's op never runs there. ``automodel_plugins.integrations.trl.SFTTrainer`` keeps TRL on the model's labelled
forward. The reference is stock ``trl.SFTTrainer`` on the same FP8 checkpoint loaded the same way (fp32, so that
both losses are compared without bf16 rounding), same data, seed and optimizer: per-step losses equal, and the
call counts say which loss ran in each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import automodel_plugins  # noqa: E402
import automodel_plugins.model.forward as forward_module  # noqa: E402
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint  # noqa: E402
from automodel_plugins.testing.tiny_models import tiny_ministral3_config  # noqa: E402

VOCAB = 128
STEPS = 3


def word_level_tokenizer(vocab: int) -> Any:
    """A tokenizer over ``t0 .. t{vocab-2}`` plus ``<pad>``, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"<pad>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="t1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Ministral3ForCausalLM

    torch.manual_seed(0)
    model = Ministral3ForCausalLM(tiny_ministral3_config(vocab_size=VOCAB))
    return write_fp8_checkpoint(model, tmp_path_factory.mktemp("trl") / "ckpt")


def dataset(*, completion_only: bool) -> Any:
    """Pre-tokenized rows of different lengths (the collator pads); a completion mask when asked."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for length in (9, 14, 11, 16, 7, 12, 15, 10):
        ids = torch.randint(0, VOCAB - 1, (length,), generator=generator).tolist()
        rows.append(ids)
    columns: dict[str, Any] = {"input_ids": rows}
    if completion_only:  # a 4-token prompt, then the completion: the loss covers the completion only
        columns["completion_mask"] = [[0] * 4 + [1] * (len(r) - 4) for r in rows]
    return datasets.Dataset.from_dict(columns)


def recording(base: type) -> type:
    """``base`` recording each training step's loss as ``training_step`` returns it."""

    class Recording(base):
        losses: list[float]

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            self.losses.append(loss.item())
            return loss

    return Recording


def train(
    trainer_class: type, path: Path, out: Path, *, completion_only: bool, accumulation: int, lora: bool
) -> tuple[list[float], dict[str, int]]:
    """``STEPS`` optimizer steps; the per-micro-batch losses and how often each head ran."""
    import peft
    from trl.trainer import utils as trl_utils

    counts = {"ours": 0, "trl": 0}
    ours, theirs = forward_module.linear_cross_entropy, trl_utils._ChunkedLogProbFunction.apply

    def count_ours(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["ours"] += 1
        return ours(*args, **kwargs)

    def count_theirs(*args: Any, **kwargs: Any) -> Any:
        counts["trl"] += 1
        return theirs(*args, **kwargs)

    model = automodel_plugins.from_pretrained(path, dtype=torch.float32)
    config = trl.SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=7,
        completion_only_loss=completion_only,
        dataloader_num_workers=0,
        bf16=False,  # TRL's default is bf16 autocast; fp32 compares the two losses without its rounding
    )
    peft_config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = recording(trainer_class)(
        model=model,
        args=config,
        train_dataset=dataset(completion_only=completion_only),
        processing_class=word_level_tokenizer(VOCAB),
        peft_config=peft_config,
    )
    trainer.losses = []
    mp = pytest.MonkeyPatch()
    mp.setattr(forward_module, "linear_cross_entropy", count_ours)
    mp.setattr(trl_utils._ChunkedLogProbFunction, "apply", count_theirs)
    try:
        trainer.train()
    finally:
        mp.undo()
    return trainer.losses, counts


@pytest.mark.parametrize(
    ("completion_only", "accumulation", "lora"),
    [(False, 1, False), (True, 2, True)],
    ids=["full-fine-tune", "completion-only-lora-accumulation-2"],
)
def test_sft_trainer_runs_our_fused_loss_with_stock_losses(
    checkpoint: Path, tmp_path: Path, completion_only: bool, accumulation: int, lora: bool
) -> None:
    from automodel_plugins.integrations.trl import SFTTrainer

    options = {"completion_only": completion_only, "accumulation": accumulation, "lora": lora}
    stock_losses, stock_counts = train(trl.SFTTrainer, checkpoint, tmp_path / "stock", **options)
    losses, counts = train(SFTTrainer, checkpoint, tmp_path / "ours", **options)
    micro_batches = STEPS * accumulation
    assert stock_counts == {"ours": 0, "trl": micro_batches}, "stock TRL trains through its own head"
    assert counts == {"ours": micro_batches, "trl": 0}, "our op must be the loss that runs"
    assert len(losses) == len(stock_losses) == micro_batches
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), atol=2e-5, rtol=0)
    assert losses[-1] != losses[0]


def test_options_our_loss_does_not_implement_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    from automodel_plugins.integrations.trl import SFTTrainer

    model = automodel_plugins.from_pretrained(checkpoint, dtype=torch.float32)
    config = trl.SFTConfig(output_dir=str(tmp_path), loss_type="dft", report_to=[], use_cpu=True)
    with pytest.raises(automodel_plugins.errors.TrainerOptionError, match="loss_type='dft'"):
        SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset(completion_only=False),
            processing_class=word_level_tokenizer(VOCAB),
        )
