"""The way out from a hub repo id: ``convert REPO_ID DST`` and ``save_pretrained(..., quantization="source")``
of a model loaded from a repo, against the stand-in hub on 127.0.0.1.

References: the same conversion of the local directory the repo was made from (byte for byte), the repo's
own shard bytes (a source save right after loading gives them back), and stock transformers reading the
result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_checkpoints import NEVER_FETCHED, mistral_extras, registry, write_llama
from safetensors.torch import load_file

import automodel_plugins
from automodel_plugins.cli import main as cli_main
from automodel_plugins.pipeline.save.convert import convert_checkpoint
from automodel_plugins.registry import set_registry
from automodel_plugins.testing.compare import assert_same_state_dict, load_stock
from automodel_plugins.testing.fake_hub import FakeHub

REPO = "org/convert-me"
TOKENIZER = {"tokenizer.json": b'{"version": "1.0"}', "generation_config.json": b'{"do_sample": false}'}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("to-convert") / "ckpt")


@pytest.fixture
def hub(fake_hub: FakeHub, checkpoint: Path) -> FakeHub:
    fake_hub.add_directory(REPO, checkpoint, extra={**mistral_extras(checkpoint), **TOKENIZER})
    fake_hub.reset_counters()
    return fake_hub


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors itself."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def served_files(hub: FakeHub) -> set[str]:
    prefix = f"{REPO}:"
    return {
        key[len(prefix) :] for key, n in hub.bytes_served["files"].items() if key.startswith(prefix) and n
    }


@pytest.mark.parametrize("to", ["bf16", "fp8-block"])
def test_convert_of_a_repo_id_equals_the_conversion_of_its_directory(
    hub: FakeHub, checkpoint: Path, tmp_path: Path, to: str
) -> None:
    from_repo = convert_checkpoint(REPO, tmp_path / "repo", to=to, registry=registry(), progress=False)
    local = convert_checkpoint(checkpoint, tmp_path / "local", to=to, registry=registry(), progress=False)
    weights = sorted(f for f in local.files if not f.endswith(".json") or f.endswith(".index.json"))
    assert sorted(f for f in from_repo.files if f in weights) == weights
    for file in sorted((tmp_path / "local").glob("*.safetensors")):
        assert (tmp_path / "repo" / file.name).read_bytes() == file.read_bytes(), file.name
    # The tokenizer's and generation config's .json come along; nothing no load needs was downloaded.
    for name, data in TOKENIZER.items():
        assert (tmp_path / "repo" / name).read_bytes() == data
    assert not served_files(hub) & set(NEVER_FETCHED)
    assert not (tmp_path / "repo" / "params.json").exists()
    assert not (tmp_path / "repo" / "modeling_llama.py").exists()


def test_convert_cli_takes_a_repo_id_and_the_hub_options(hub: FakeHub, tmp_path: Path) -> None:
    previous = set_registry(registry())
    try:
        status = cli_main(["convert", REPO, str(tmp_path / "out"), "--to", "bf16", "--no-progress"])
        assert status == 0
        again = cli_main(
            ["convert", REPO, str(tmp_path / "again"), "--to", "bf16", "--no-progress", "--local-files-only"]
        )
        assert again == 0  # everything it needs is in the cache now
    finally:
        set_registry(previous)
    converted = load_stock(tmp_path / "out")
    assert_same_state_dict(converted, automodel_plugins.from_pretrained(REPO, registry=registry()))


def test_source_save_of_a_model_loaded_from_a_repo_gives_back_its_shards(
    hub: FakeHub, checkpoint: Path, tmp_path: Path
) -> None:
    plugins = registry()
    model = automodel_plugins.from_pretrained(REPO, registry=plugins)
    report = automodel_plugins.save_pretrained(model, tmp_path / "saved", progress=False, registry=plugins)
    assert report.quantized > 0
    saved, source = stored_tensors(tmp_path / "saved"), stored_tensors(checkpoint)
    assert saved.keys() == source.keys()
    for key, tensor in source.items():  # every weight, scale and activation scale, byte for byte
        assert saved[key].dtype == tensor.dtype and saved[key].shape == tensor.shape, key
        assert bytes(saved[key].reshape(-1).view(torch.uint8).numpy()) == bytes(
            tensor.reshape(-1).view(torch.uint8).numpy()
        ), key
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    source_config = json.loads((checkpoint / "config.json").read_text())
    assert saved_config["quantization_config"] == source_config["quantization_config"]
