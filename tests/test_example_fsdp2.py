"""``examples/train_fsdp2.py`` as a user runs it: ``torchrun --nproc_per_node 2`` on gloo against a tiny FP8 checkpoint
(issue 21 item 8). Each test launches it once; what the example saved is checked with stock transformers and PEFT.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from automodel_plugins.testing.compare import load_stock

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_fsdp2.py"
WORLD = 2
STEPS = 4


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_fsdp2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from distributed import _tiny  # the distributed tests' tiny VLM: odd sizes, uneven shards

    return _tiny.write_checkpoint(
        tmp_path_factory.mktemp("example") / "ckpt", block_size=None, tie_word_embeddings=False
    )


def run_example(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from distributed.conftest import free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(EXAMPLE), "--model", str(checkpoint), "--steps", str(STEPS), "--out", str(out),
        "--backend", "gloo", "--device", "cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOMODEL_PLUGINS_PROGRESS": "0"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def stock_loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """The stock forward's mean loss over every rank's synthetic batch."""
    with torch.no_grad():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def rank_batches(checkpoint: Path) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    example, config = load_example(), AutoConfig.from_pretrained(checkpoint)
    return [example.synthetic_batch(config, rank=rank, batch=2, seq=32) for rank in range(WORLD)]


def check_losses(out: Path) -> list[float]:
    record = json.loads((out / "losses.json").read_text())
    losses = record["losses"]
    assert record["world_size"] == WORLD
    assert len(losses) == STEPS
    assert losses[-1] < losses[0], losses
    return losses


def test_full_fine_tune_saves_fp8_that_stock_transformers_loads(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    done = run_example(checkpoint, out, "--full")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    check_losses(out)
    saved = json.loads((out / "finetuned-fp8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8"
    batches = rank_batches(checkpoint)
    before = stock_loss(load_stock(checkpoint, dtype=torch.float32), batches)
    after = stock_loss(load_stock(out / "finetuned-fp8", dtype=torch.float32), batches)
    assert after < before - 0.05, (before, after)  # what the steps learned survives the FP8 save


def test_lora_on_fp8_resident_base_saves_an_adapter_peft_loads(checkpoint: Path, tmp_path: Path) -> None:
    import peft

    out = tmp_path / "lora"
    done = run_example(checkpoint, out, "--fp8-resident", "--lora-r", "4")
    log = done.stdout + done.stderr
    check_losses(out)
    base = load_stock(checkpoint, dtype=torch.float32)
    batches = rank_batches(checkpoint)
    before = stock_loss(base, batches)
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    assert stock_loss(adapted, batches) < before - 0.05  # the adapter's training, on a stock base
    assert done.returncode == 0, log[-8000:]
    merged = stock_loss(load_stock(out / "finetuned-fp8", dtype=torch.float32), batches)
    assert merged < before - 0.05
