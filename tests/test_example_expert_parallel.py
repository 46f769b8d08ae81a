"""``examples/expert_parallel.py`` as a user runs it: ``torchrun --nproc_per_node 2 ... --ep 2`` on gloo against a
tiny Qwen3-VL-MoE FP8 checkpoint (4 experts, per-expert block pieces). The full fine-tune's losses are checked
against one process running the same SGD steps on the mean of the two ranks' batches; the FP8-resident run
(LoRA on the attention, the experts ``Fp8Experts`` split by expert) for what each rank holds and read."""

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

import automodel_plugins

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "expert_parallel.py"
WORLD, STEPS, LR = 2, 3, 0.05


def load_example() -> Any:
    sys.path.insert(0, str(EXAMPLE.parent))  # it imports train_fsdp2's helpers, as a script beside it does
    spec = importlib.util.spec_from_file_location("expert_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from distributed._expert_parallel import _write_qwen

    path = tmp_path_factory.mktemp("example-ep") / "ckpt"
    _write_qwen(path)
    return path


def run_example(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from distributed.conftest import free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(EXAMPLE), "--model", str(checkpoint), "--ep", "2", "--steps", str(STEPS), "--lr", str(LR),
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOMODEL_PLUGINS_PROGRESS": "0"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_full_fine_tune_with_expert_parallelism_equals_one_process(checkpoint: Path, tmp_path: Path) -> None:
    done = run_example(checkpoint, tmp_path / "full", "--full", "--dtype", "float32")
    assert done.returncode == 0, done.stderr[-4000:]
    losses = json.loads((tmp_path / "full" / "losses.json").read_text())["losses"]
    example = load_example()
    model = automodel_plugins.from_pretrained(checkpoint, dtype=torch.float32, skip_logits=True).train()
    batches = [example.synthetic_batch(model.config, rank=r, batch=2, seq=32) for r in range(WORLD)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    single = []
    for _ in range(STEPS):
        loss = sum(model(**batch).loss for batch in batches) / WORLD
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        single.append(loss.item())
    assert single[-1] < single[0]
    assert losses == pytest.approx(single, rel=1e-5, abs=0), (losses, single)
    for rank in range(WORLD):
        held = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())["experts"]
        assert len(held) == 2 and all("2 of 4 experts" in v for v in held.values())


def test_fp8_resident_experts_split_by_expert_under_lora(checkpoint: Path, tmp_path: Path) -> None:
    done = run_example(checkpoint, tmp_path / "lora", "--fp8-resident", "--lora-r", "4")
    assert done.returncode == 0, done.stderr[-4000:]
    losses = json.loads((tmp_path / "lora" / "losses.json").read_text())["losses"]
    assert losses[-1] < losses[0], losses
    ranks = [json.loads((tmp_path / "lora" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank in ranks:  # PEFT-wrapped: the experts found under the base model, FP8-resident
        assert sorted(rank["experts"]) == [
            f"base_model.model.model.language_model.layers.{i}.mlp.experts" for i in range(2)
        ]
        assert all(v == "Fp8Experts: 2 of 4 experts a rank" for v in rank["experts"].values())
    whole = automodel_plugins.from_pretrained(checkpoint, dequantize=False)
    read_whole = whole.automodel_composition.load.bytes_read
    assert ranks[0]["bytes_read"] == ranks[1]["bytes_read"] < read_whole
