"""Repo ids resolved from a Hugging Face cache the test lays out by hand (blobs, relative snapshot links,
``refs/<branch>``), with ``HF_HUB_OFFLINE=1``: every entry point loads the repo id as it loads the directory,
``revision=`` picks its snapshot, and a local directory of the same spelling wins, as in transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_plugins import llama_claimer
from hub_checkpoints import mistral_extras, registry, write_llama
from transformers import AutoConfig, LlamaForCausalLM

import automodel_plugins
from automodel_plugins.cli import main as cli_main
from automodel_plugins.errors import HubOfflineError, SourceNotFoundError
from automodel_plugins.sources import HubLocation, resolve
from automodel_plugins.testing.compare import assert_same_state_dict, load_stock
from automodel_plugins.testing.hub_cache import repo_folder, write_cached_repo

REPO = "org/tiny-llama"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of the model (different weights), per-tensor FP8 so that stock transformers reads them
    exactly and can serve as the independent reference."""
    root = tmp_path_factory.mktemp("versions")
    return {
        "v1": write_llama(root / "v1", seed=0, block_size=None),
        "v2": write_llama(root / "v2", seed=1, block_size=None),
    }


@pytest.fixture
def cached(hf_cache: Path, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """``main`` -> v1 (with the Mistral extras beside it), branch ``v2`` -> v2; returns the snapshots."""
    v1 = {**_files(checkpoints["v1"]), **mistral_extras(checkpoints["v1"])}
    return {
        "v1": write_cached_repo(hf_cache, REPO, v1),
        "v2": write_cached_repo(hf_cache, REPO, checkpoints["v2"], revision="v2"),
    }


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_from_pretrained_of_the_repo_id_is_the_directory_load(
    cached: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    ours = automodel_plugins.from_pretrained(REPO, registry=registry())
    assert ours.automodel_composition.plugin == "claim_llama"
    assert_same_state_dict(ours, automodel_plugins.from_pretrained(checkpoints["v1"], registry=registry()))
    # Independently: stock transformers resolving the same repo id from the same cache.
    assert_same_state_dict(ours, load_stock(REPO, model_class=LlamaForCausalLM))
    assert ours.config.name_or_path == REPO  # as transformers names it (PEFT adapters record it)


def test_revision_picks_its_snapshot(cached: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    expected = load_stock(checkpoints["v2"], model_class=LlamaForCausalLM)
    for revision in ("v2", cached["v2"].name):  # the branch, and the commit it points at
        model = automodel_plugins.from_pretrained(REPO, revision=revision, registry=registry())
        assert_same_state_dict(model, expected)
    config = automodel_plugins.load_config(REPO, revision="v2")
    assert config.name_or_path == REPO


def test_build_model_and_load_weights_of_the_repo_id(
    cached: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    model = automodel_plugins.build_model(REPO, revision="v2", registry=registry())
    assert next(model.parameters()).is_meta
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, REPO, revision="v2", registry=registry())
    assert report.dequantized == 14
    assert_same_state_dict(model, load_stock(checkpoints["v2"], model_class=LlamaForCausalLM))


def test_list_config_on_the_repo_id(
    cached: dict[str, Path], capsys: pytest.CaptureFixture, isolated_registry: automodel_plugins.Registry
) -> None:
    assert isolated_registry.register(llama_claimer, name="claim_llama").status == "loaded"
    assert cli_main(["list", "--config", REPO, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["claimed_by"] == "claim_llama"
    assert cli_main(["list", "--config", REPO, "--revision", "nope"]) == 2
    assert REPO in capsys.readouterr().err


def test_inspect_of_the_repo_id_describes_the_directory(
    cached: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    ours = automodel_plugins.describe_checkpoint(REPO, registry=registry())
    local = automodel_plugins.describe_checkpoint(checkpoints["v1"], registry=registry())
    assert ours["path"] == str(cached["v1"]) and local["hub"] is None
    for key in ("config", "claims", "plugin", "checkpoint", "load", "bytes_read"):
        assert ours[key] == local[key], key
    hub = ours["hub"]
    assert hub["commit"] == cached["v1"].name and hub["download_bytes"] == 0
    assert (
        hub["load_bytes"]
        == hub["cached_bytes"]
        == sum((checkpoints["v1"] / name).stat().st_size for name in hub["files_read"])
    )
    assert hub["not_downloaded"] is None  # offline: the repo's own listing is not asked for


def test_a_local_directory_wins_over_a_repo_id_of_the_same_spelling(
    cached: dict[str, Path],
    checkpoints: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "org").mkdir()
    os.symlink(checkpoints["v2"], tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    assert not isinstance(resolve(REPO), HubLocation)
    model = automodel_plugins.from_pretrained(REPO, registry=registry())
    assert_same_state_dict(model, load_stock(checkpoints["v2"], model_class=LlamaForCausalLM))


def test_offline_with_nothing_cached_names_the_repo_and_what_to_do(hf_cache: Path) -> None:
    for call in (automodel_plugins.load_config, automodel_plugins.from_pretrained):
        with pytest.raises(HubOfflineError) as caught:
            call("org/never-downloaded")
        assert isinstance(caught.value, SourceNotFoundError)  # as a missing path is
        message = str(caught.value)
        assert (
            "org/never-downloaded" in message and "HF_HUB_OFFLINE=1" in message and str(hf_cache) in message
        )


def test_a_cached_config_without_its_shards_fails_offline_naming_the_shard(
    hf_cache: Path, checkpoints: dict[str, Path]
) -> None:
    files = {n: b for n, b in _files(checkpoints["v1"]).items() if n != "model-00002-of-00003.safetensors"}
    write_cached_repo(hf_cache, "org/partial", files)
    assert automodel_plugins.load_config("org/partial").model_type == "llama"
    with pytest.raises(HubOfflineError, match=r"model-00002-of-00003\.safetensors"):
        automodel_plugins.from_pretrained("org/partial", registry=registry())


def test_the_hand_laid_cache_is_what_huggingface_hub_writes(hf_cache: Path, cached: dict[str, Path]) -> None:
    """The layout the other tests rely on, checked against huggingface_hub's own reader of the cache."""
    from huggingface_hub import scan_cache_dir

    assert cached["v1"].parent.parent == repo_folder(hf_cache, REPO)
    info = scan_cache_dir(hf_cache)
    (repo,) = [r for r in info.repos if r.repo_id == REPO]
    refs = {rev.commit_hash: set(rev.refs) for rev in repo.revisions}
    assert refs == {cached["v1"].name: {"main"}, cached["v2"].name: {"v2"}} and not info.warnings
    assert AutoConfig.from_pretrained(REPO, revision="v2").model_type == "llama"


def test_the_stock_path_takes_the_repo_id_too(cached: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    """No plugin claims it: transformers loads the repo id itself, at the commit the config came from."""
    model = automodel_plugins.from_pretrained(REPO, revision="v2", registry=automodel_plugins.Registry())
    assert model.automodel_composition.plugin is None
    assert_same_state_dict(model, load_stock(checkpoints["v2"], model_class=LlamaForCausalLM))
