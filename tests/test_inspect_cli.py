"""``automodel-plugins inspect PATH [--json]``: the installed console script, run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_plugins import installed
from transformers import LlamaForCausalLM

from automodel_plugins.cli import main
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.pytest_plugin import subprocess_env
from automodel_plugins.testing.tiny_models import tiny_llama_config, tiny_mistral3_config


def console_script() -> list[str]:
    """The ``automodel-plugins`` entry point of this environment (beside the interpreter), else ``-m``."""
    script = Path(sys.executable).parent / "automodel-plugins"
    if script.is_file():
        return [str(script)]
    found = shutil.which("automodel-plugins")
    return [found] if found else [sys.executable, "-m", "automodel_plugins.cli"]


def inspect(path: Path, *args: str, plugins: str | None = "") -> subprocess.CompletedProcess[str]:
    """Run ``inspect``; ``plugins`` is ``AUTOMODEL_PLUGINS`` (``""``: none loaded, ``None``: all installed)."""
    env = subprocess_env({"AUTOMODEL_PLUGINS": plugins, "AUTOMODEL_PLUGINS_PROGRESS": "0"})
    return subprocess.run(
        [*console_script(), "inspect", str(path), *args], env=env, capture_output=True, text=True, timeout=300
    )


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # the whole stdout is one JSON value
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def llama_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    return write_fp8_checkpoint(
        model, tmp_path_factory.mktemp("llama"), modules_to_not_convert=("lm_head",), shards=2
    )


def test_json_is_one_object_describing_the_checkpoint(llama_fp8: Path) -> None:
    document = as_json(inspect(llama_fp8, "--json"))
    assert document["config"]["model_type"] == "llama" and document["config"]["num_hidden_layers"] == 2
    assert document["config"]["quantization"]["quant_method"] == "fp8"
    assert document["plugin"] is None and document["claims"] == [] and document["load"] is None
    files = document["checkpoint"]
    assert files["index"] is True and len(files["files"]) == 2
    assert files["fp8_tensors"] == 14 and files["tensors_by_dtype"]["float8_e4m3fn"] == 14
    assert files["file_bytes"] == sum(p.stat().st_size for p in llama_fp8.glob("*.safetensors"))
    assert document["bytes_read"] == 0


# In-process from here (``main`` returns the exit status): the subprocess above already covers the wiring.


def test_readable_block_without_json(
    llama_fp8: Path, isolated_registry: Any, capsys: pytest.CaptureFixture
) -> None:
    assert main(["inspect", str(llama_fp8)]) == 0
    out = capsys.readouterr().out
    assert "model_type: llama" in out and "fp8_tensors: 14" in out and "load: null" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_broken_checkpoint_exits_2_naming_the_file(
    llama_fp8: Path, tmp_path: Path, isolated_registry: Any, capsys: pytest.CaptureFixture
) -> None:
    broken = Path(shutil.copytree(llama_fp8, tmp_path / "broken"))
    (broken / "config.json").write_text("{not json")
    assert main(["inspect", str(broken), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(broken / "config.json") in captured.err and "malformed JSON" in captured.err


def test_truncated_shard_exits_2_naming_the_shard(
    llama_fp8: Path, tmp_path: Path, isolated_registry: Any, capsys: pytest.CaptureFixture
) -> None:
    broken = Path(shutil.copytree(llama_fp8, tmp_path / "broken"))
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["inspect", str(broken)]) == 2
    assert shard.name in capsys.readouterr().err


@pytest.mark.skipif(
    not installed("automodel-plugins-mistral3-fp8"), reason="mistral3_fp8 plugin not installed"
)
def test_claimed_checkpoint_gets_a_planned_load(tmp_path: Path) -> None:
    """With the installed Mistral3 plugin: the claim, the layout and the FP8 counts of the plan."""
    from transformers import Mistral3ForConditionalGeneration

    config = tiny_mistral3_config(  # Ministral3Config's own default rope, Pixtral's default image size
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        rope_parameters=None,
        vision={"image_size": 1024},
    )
    model = Mistral3ForConditionalGeneration(config)
    path = write_fp8_checkpoint(model, tmp_path / "m3", block_size=(16, 16))
    document = as_json(inspect(path, "--json", plugins="mistral3_fp8"))
    assert document["plugin"] == "mistral3_fp8"
    load = document["load"]
    assert load["layout"] == "runtime" and load["granularity"] == "block 16x16"
    assert load["fp8_tensors"] == 7 and load["dropped_keys"] == 7
    assert load["model_tensors"] == len({id(p) for p in model.parameters()})
    # dequantize=False: the 7 FP8 weights at 1 byte + a 2x2 / 2x4 / 4x2 fp32 grid + their 0-d fp32 static
    # activation scale (kept: the checkpoint's activation_scheme is static) instead of 2 bytes (BF16)
    fp8 = {n: p for n, p in model.named_parameters() if n.endswith("_proj.weight") and "language_model" in n}
    assert len(fp8) == load["fp8_resident_layers"] == 7
    grids = sum(-(-p.shape[0] // 16) * -(-p.shape[1] // 16) for p in fp8.values())
    saved = sum(p.numel() for p in fp8.values()) * (2 - 1) - grids * 4 - len(fp8) * 4
    assert load["bytes_after_load"] - load["bytes_after_load_fp8_resident"] == saved
    assert document["bytes_read"] == 0
