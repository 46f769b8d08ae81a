"""The README's Python runs as written (issue 21 item 7).

Every ```python block of README.md, in order, joined into one script and run in a fresh subprocess (in an empty
working directory, where the blocks' relative destinations land). The one substitution: the hub repo id the
README names is replaced by the path of a tiny FP8 Mistral3 checkpoint generated here (same class, legacy key
layout and per-tensor FP8 as the real repo; no network). A block whose first line is the marker comment
``# readme-test: multi-process`` needs several processes: it is left out here and runs as
``examples/train_fsdp2.py`` in ``tests/test_example_fsdp2.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REPO_ID = '"mistralai/Ministral-3-8B-Instruct-2512"'
MULTI_PROCESS = "# readme-test: multi-process"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def runnable_script(text: str, checkpoint: Path) -> str:
    """The blocks a single process runs, joined, with the repo id replaced by ``checkpoint``."""
    blocks = [b for b in python_blocks(text) if not b.startswith(MULTI_PROCESS)]
    script = "\n".join(blocks)
    assert REPO_ID in script, f"the README's blocks no longer name {REPO_ID}: update the substitution"
    return script.replace(REPO_ID, repr(str(checkpoint)))


def test_the_readme_has_the_blocks_this_test_expects() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    assert sum(b.startswith(MULTI_PROCESS) for b in blocks) == 1, "the FSDP2 block, marked"


def test_readme_python_blocks_run_in_sequence(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from distributed import _tiny  # the tiny Mistral3 VLM in the real on-disk format

    checkpoint = _tiny.write_checkpoint(tmp_path / "ckpt", block_size=None, tie_word_embeddings=False)
    script = tmp_path / "readme.py"
    script.write_text(runnable_script(README.read_text(), checkpoint))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "AUTOMODEL_PLUGINS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=work, capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(f"the README's Python failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    assert done.stdout.splitlines()[0] == "Mistral3ForConditionalGeneration"
    saved = sorted(p.name for p in work.iterdir())
    assert saved == ["finetuned-bf16", "finetuned-fp8", "finetuned-resident-fp8"]
