"""One resolver decides what a checkpoint path names, for config loading and checkpoint reading alike: a model
directory, its ``model.safetensors``, its index, or its ``config.json`` all load the same model; a missing path
is one error that both a config reader and a checkpoint reader catch.

Also the default adapter: a plugin that implements no ``state_dict_adapter`` gets one that reads the config's
``quantization_config``, so a block-FP8 checkpoint loads (stock transformers' loader is the reference)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from fake_plugins import llama_claimer
from transformers import LlamaForCausalLM

from automodel_plugins import Checkpoint, CheckpointError, ConfigError, from_pretrained
from automodel_plugins.cli import main as cli_main
from automodel_plugins.errors import SourceNotFoundError
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.registry import Registry
from automodel_plugins.sources import INDEX_NAME, SAFETENSORS_NAME, load_config, resolve
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_state_dict, reference_model
from automodel_plugins.testing.tiny_models import tiny_llama_config


def registry() -> Registry:
    registry = Registry()
    assert registry.register(llama_claimer, name="claim_only").status == "loaded"
    return registry


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(intermediate_size=200)).eval()


@pytest.fixture(scope="module")
def single(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-tensor FP8 in one ``model.safetensors``."""
    return write_fp8_checkpoint(llama, tmp_path_factory.mktemp("single"), modules_to_not_convert=("lm_head",))


@pytest.fixture(scope="module")
def sharded(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Block FP8 (32x32, partial edges: 200 = 6 * 32 + 8) in three shards with an index."""
    return write_fp8_checkpoint(
        llama,
        tmp_path_factory.mktemp("sharded"),
        block_size=(32, 32),
        modules_to_not_convert=("lm_head",),
        shards=3,
    )


# --- what a path names ------------------------------------------------------------------------------------


def test_a_directory_names_its_config_and_its_own_weights(single: Path, sharded: Path) -> None:
    location = resolve(single)
    assert location.config_file() == single.resolve() / "config.json"
    assert location.weights().file == single.resolve() / SAFETENSORS_NAME and location.weights().index is None
    assert resolve(sharded).weights().index == sharded.resolve() / INDEX_NAME


@pytest.mark.parametrize("name", [SAFETENSORS_NAME, "config.json"])
def test_a_file_inside_a_directory_names_that_checkpoint(single: Path, name: str) -> None:
    location = resolve(single / name)
    assert location.directory == single.resolve()
    assert location.config_file() == single.resolve() / "config.json"
    assert location.weights().file == single.resolve() / SAFETENSORS_NAME


def test_an_index_path_names_the_index(sharded: Path) -> None:
    location = resolve(sharded / INDEX_NAME)
    assert location.weights().index == sharded.resolve() / INDEX_NAME
    assert location.config_file() == sharded.resolve() / "config.json"


def test_a_missing_path_is_both_a_config_and_a_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    for call in (resolve, load_config, Checkpoint.open, from_pretrained):
        with pytest.raises(SourceNotFoundError) as caught:
            call(missing)
        assert isinstance(caught.value, ConfigError) and isinstance(caught.value, CheckpointError)
        assert caught.value.path == missing and str(missing) in str(caught.value)


def test_a_file_of_another_kind_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a checkpoint directory") as caught:
        Checkpoint.open(tmp_path / "pytorch_model.bin")
    assert caught.value.path == tmp_path / "pytorch_model.bin"


def test_a_weights_file_without_a_config_beside_it(single: Path, tmp_path: Path) -> None:
    shutil.copy(single / SAFETENSORS_NAME, tmp_path / SAFETENSORS_NAME)
    with pytest.raises(ConfigError, match=r"no config\.json beside the named weights") as caught:
        load_config(tmp_path / SAFETENSORS_NAME)
    assert caught.value.path == tmp_path / "config.json"
    with Checkpoint.open(tmp_path / SAFETENSORS_NAME) as checkpoint:  # the tensors alone are still readable
        assert len(checkpoint) > 0


# --- the same model whichever path names it ---------------------------------------------------------------


@pytest.mark.parametrize("name", [None, SAFETENSORS_NAME, "config.json"])
def test_from_pretrained_of_a_single_file_checkpoint(single: Path, name: str | None) -> None:
    """The reported bug: ``from_pretrained(".../model.safetensors")`` read the weights file as its config."""
    path = single if name is None else single / name
    model = from_pretrained(path, registry=registry())
    assert_same_state_dict(model, LlamaForCausalLM.from_pretrained(single, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", [None, INDEX_NAME, "config.json"])
def test_from_pretrained_of_a_sharded_block_fp8_checkpoint_without_a_plugin_adapter(
    sharded: Path, name: str | None
) -> None:
    """The plugin implements no ``state_dict_adapter``: the default reads the 32x32 blocks from the config.
    Stock transformers misreads partial edge blocks, so the reference is the independent dequantization."""
    path = sharded if name is None else sharded / name
    model = from_pretrained(path, registry=registry())
    assert model.automodel_composition.adapter["granularity"] == "block 32x32"
    assert_same_state_dict(model, reference_model(sharded))


def test_inspect_and_list_accept_a_weights_file_path(single: Path, capsys: pytest.CaptureFixture) -> None:
    described = describe_checkpoint(single / SAFETENSORS_NAME, registry=registry())
    assert described["plugin"] == "claim_only" and described["bytes_read"] == 0
    assert described["load"]["fp8_tensors"] == 2 * 7
    assert cli_main(["list", "--config", str(single / SAFETENSORS_NAME), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["claims"] is not None


def test_the_stock_path_refuses_a_weights_file_it_would_not_load(
    llama: LlamaForCausalLM, tmp_path: Path
) -> None:
    """No plugin claims: transformers loads a directory's own weights, so naming another file is an error
    rather than a silent swap; naming the directory's own ``model.safetensors`` loads it."""
    copy.deepcopy(llama).to(torch.bfloat16).save_pretrained(tmp_path)
    empty = Registry()
    model = from_pretrained(tmp_path / SAFETENSORS_NAME, registry=empty)
    assert model.automodel_composition.plugin is None
    assert_same_state_dict(model, LlamaForCausalLM.from_pretrained(tmp_path))
    (tmp_path / SAFETENSORS_NAME).rename(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="pass the directory") as caught:
        from_pretrained(tmp_path / "other.safetensors", registry=empty)
    assert caught.value.path == tmp_path.resolve() / "other.safetensors"
