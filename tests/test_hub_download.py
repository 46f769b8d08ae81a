"""Repo ids against a stand-in hub on 127.0.0.1 (``fake_hub``), which counts what it serves per file.

A load downloads exactly ``config.json``, the index and the shards the index names (never the Mistral-native
``consolidated.safetensors`` beside them, nor pickles, GGUF or code), once; ``inspect`` downloads the config and
the index and reads each shard's header with range requests; a pipeline stage downloads only its shards.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hub_checkpoints import NEVER_FETCHED, mistral_extras, registry, reshard, weights_bytes, write_llama
from torch import nn
from transformers import LlamaForCausalLM

import automodel_plugins
from automodel_plugins import Checkpoint, CheckpointError
from automodel_plugins.cli import main as cli_main
from automodel_plugins.errors import CorruptCheckpointError, HubFileNotFoundError
from automodel_plugins.sources import INDEX_NAME, SAFETENSORS_NAME, resolve
from automodel_plugins.testing.compare import assert_same_state_dict, load_stock, reference_model
from automodel_plugins.testing.fake_hub import FakeHub

REPO = "org/served-llama"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("served") / "ckpt")


@pytest.fixture(scope="module")
def extras(checkpoint: Path) -> dict[str, bytes]:
    return mistral_extras(checkpoint)


@pytest.fixture
def hub(fake_hub: FakeHub, checkpoint: Path, extras: dict[str, bytes]) -> FakeHub:
    """The stand-in hub serving ``REPO`` (shards, index, config and the Mistral extras), counters at zero."""
    fake_hub.add_directory(REPO, checkpoint, extra=extras)
    fake_hub.reset_counters()
    return fake_hub


def served(hub: FakeHub, repo: str = REPO) -> dict[str, int]:
    """File name -> body bytes the hub sent for it (range requests included)."""
    prefix = f"{repo}:"
    return {k[len(prefix) :]: n for k, n in hub.bytes_served["files"].items() if k.startswith(prefix)}


def header_bytes(file: Path) -> int:
    """8 + the JSON header's length, read from the local copy: what a header-only read may fetch."""
    with open(file, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def shard_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("model-*.safetensors"))


# --- what a load downloads ------------------------------------------------------------------------------------


def test_a_load_downloads_exactly_the_config_the_index_and_the_shards(hub: FakeHub, checkpoint: Path) -> None:
    model = automodel_plugins.from_pretrained(REPO, registry=registry())
    assert served(hub) == weights_bytes(checkpoint)  # each file once, whole
    requested = " ".join(record.path for record in hub.requests)
    assert not any(name in requested for name in (*NEVER_FETCHED, "modeling_llama.py"))
    assert_same_state_dict(model, automodel_plugins.from_pretrained(checkpoint, registry=registry()))
    assert_same_state_dict(model, reference_model(checkpoint, model_class=LlamaForCausalLM))


def test_a_second_load_downloads_nothing(hub: FakeHub) -> None:
    automodel_plugins.from_pretrained(REPO, registry=registry())
    hub.reset_counters()
    automodel_plugins.from_pretrained(REPO, registry=registry())
    assert hub.bytes_served["total"] == 0
    # Pinned to the commit, cached files need no request at all; only the branch is asked for its commit.
    assert [(r.method, r.path) for r in hub.requests] == [("GET", f"/api/models/{REPO}")]


def test_files_are_shared_with_transformers(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_tensor = write_llama(
        tmp_path / "per-tensor", block_size=None
    )  # what stock transformers reads exactly
    fake_hub.add_directory("org/per-tensor", per_tensor)
    ours = automodel_plugins.from_pretrained("org/per-tensor", registry=registry())
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.reset_counters()
    stock = load_stock("org/per-tensor", model_class=LlamaForCausalLM)  # from the cache our load filled
    assert fake_hub.requests == []
    assert_same_state_dict(ours, stock)


def test_local_files_only_makes_no_request(hub: FakeHub, checkpoint: Path) -> None:
    automodel_plugins.from_pretrained(REPO, registry=registry())
    hub.reset_counters()
    model = automodel_plugins.from_pretrained(REPO, local_files_only=True, registry=registry())
    assert hub.requests == []
    assert_same_state_dict(model, reference_model(checkpoint, model_class=LlamaForCausalLM))


def test_a_resolved_location_stays_on_its_commit(hub: FakeHub, checkpoint: Path, tmp_path: Path) -> None:
    location = resolve(REPO)
    location.config_file()  # resolves main to its commit
    newer = write_llama(tmp_path / "newer", seed=5)
    hub.add_directory(REPO, newer)  # a push to main while the load runs
    try:
        model = automodel_plugins.from_pretrained(location, registry=registry())
        assert_same_state_dict(model, reference_model(checkpoint, model_class=LlamaForCausalLM))
        fresh = automodel_plugins.from_pretrained(REPO, registry=registry())
        assert_same_state_dict(fresh, reference_model(newer, model_class=LlamaForCausalLM))
    finally:
        hub.remove_repo(REPO)


def test_a_single_file_repo_downloads_its_model_safetensors(
    fake_hub: FakeHub, checkpoint: Path, tmp_path: Path
) -> None:
    single = write_llama(tmp_path / "single", seed=2)
    merged = reshard(single, tmp_path / "merged", lambda key: 0, 1)
    (merged / INDEX_NAME).unlink()
    (merged / "model-00001-of-00001.safetensors").rename(merged / SAFETENSORS_NAME)
    fake_hub.add_directory("org/single-file", merged)
    model = automodel_plugins.from_pretrained("org/single-file", registry=registry())
    assert set(served(fake_hub, "org/single-file")) == {"config.json", SAFETENSORS_NAME}
    assert_same_state_dict(model, reference_model(merged, model_class=LlamaForCausalLM))


def test_a_repo_with_only_consolidated_weights_says_so(fake_hub: FakeHub, checkpoint: Path) -> None:
    files = {"config.json": (checkpoint / "config.json").read_bytes()}
    files["consolidated.safetensors"] = mistral_extras(checkpoint)["consolidated.safetensors"]
    fake_hub.add_repo("org/native-only", files)
    for call in (automodel_plugins.from_pretrained, automodel_plugins.describe_checkpoint):
        with pytest.raises(HubFileNotFoundError, match=r"consolidated\.safetensors") as caught:
            call("org/native-only", registry=registry())
        assert "org/native-only" in str(caught.value) and caught.value.filename == SAFETENSORS_NAME
    assert served(fake_hub, "org/native-only").get("consolidated.safetensors", 0) == 0


def test_an_index_naming_other_kinds_of_file_is_refused_before_fetching(
    fake_hub: FakeHub, checkpoint: Path
) -> None:
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "pytorch_model.bin"
    fake_hub.add_directory(
        "org/pickled",
        checkpoint,
        extra={INDEX_NAME: json.dumps(index).encode(), "pytorch_model.bin": b"\x80\x04 pickle"},
    )
    with pytest.raises(HubFileNotFoundError, match=r"refusing to fetch 'pytorch_model\.bin'"):
        automodel_plugins.from_pretrained("org/pickled", registry=registry())
    assert "pytorch_model.bin" not in " ".join(r.path for r in fake_hub.requests)


def test_downloads_follow_a_redirect_to_another_origin(hub: FakeHub, checkpoint: Path) -> None:
    """As the real hub sends LFS files to its CDN: downloads and range requests follow the redirect."""
    hub.lfs_redirect = True
    description = automodel_plugins.describe_checkpoint(REPO, registry=registry())
    assert description["checkpoint"]["file_bytes"] == sum(
        weights_bytes(checkpoint)[n] for n in shard_names(checkpoint)
    )
    model = automodel_plugins.from_pretrained(REPO, registry=registry())
    assert any(record.server == "cdn" for record in hub.requests)
    assert_same_state_dict(model, reference_model(checkpoint, model_class=LlamaForCausalLM))


# --- inspect: headers only --------------------------------------------------------------------------------


def test_inspect_downloads_no_tensor_data(hub: FakeHub, checkpoint: Path, extras: dict[str, bytes]) -> None:
    ours = automodel_plugins.describe_checkpoint(REPO, registry=registry())
    shards = shard_names(checkpoint)
    expected = {name: header_bytes(checkpoint / name) for name in shards}
    expected |= {"config.json": 0, INDEX_NAME: 0}
    expected["config.json"] = (checkpoint / "config.json").stat().st_size
    expected[INDEX_NAME] = (checkpoint / INDEX_NAME).stat().st_size
    assert served(hub) == expected  # whole config and index; of each shard only its header

    local = automodel_plugins.describe_checkpoint(checkpoint, registry=registry())
    for key in ("config", "claims", "plugin", "checkpoint", "load", "bytes_read"):
        assert ours[key] == local[key], key
    sizes = weights_bytes(checkpoint)
    summary = ours["hub"]
    assert summary["files_read"] == ["config.json", INDEX_NAME, *shards]
    assert summary["load_bytes"] == sum(sizes.values())
    assert summary["download_bytes"] == sum(sizes[n] for n in shards)  # config and index are cached now
    assert summary["not_downloaded"] == {name: len(data) for name, data in sorted(extras.items())}
    assert summary["repo_bytes"] == sum(sizes.values()) + sum(map(len, extras.values()))

    hub.reset_counters()  # the load after it fetches only what inspect did not
    automodel_plugins.from_pretrained(REPO, registry=registry())
    assert served(hub) == {name: sizes[name] for name in shards}


def test_inspect_cli_on_a_repo_id(
    hub: FakeHub, isolated_registry: automodel_plugins.Registry, capsys: pytest.CaptureFixture
) -> None:
    assert cli_main(["inspect", REPO, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["hub"]["repo_id"] == REPO and document["bytes_read"] == 0
    assert cli_main(["inspect", REPO]) == 0
    assert "consolidated.safetensors:" in capsys.readouterr().out
    assert cli_main(["inspect", "org/no-such-repo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/no-such-repo" in err


def test_a_header_only_checkpoint_refuses_data_access(hub: FakeHub, checkpoint: Path) -> None:
    with Checkpoint.open(REPO, download=False) as ckpt:
        key = "model.layers.0.mlp.down_proj.weight"
        assert ckpt.info(key).shape == (32, 200) and ckpt.info(key).dtype == torch.float8_e4m3fn
        with pytest.raises(CheckpointError, match="only this file's header was read") as caught:
            ckpt.read(key)
        assert caught.value.key == key
    assert all(
        n == header_bytes(checkpoint / name)
        for name, n in served(hub).items()
        if name in shard_names(checkpoint)
    )


def test_a_corrupt_remote_header_fails_as_the_same_file_does_locally(
    fake_hub: FakeHub, checkpoint: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = broken / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # the header now promises more data than the file holds
    fake_hub.add_directory("org/truncated", broken)
    with pytest.raises(CorruptCheckpointError) as remote:
        automodel_plugins.describe_checkpoint("org/truncated", registry=registry())
    with pytest.raises(CorruptCheckpointError) as local:
        automodel_plugins.describe_checkpoint(broken, registry=registry())
    assert remote.value.key == local.value.key and remote.value.path.name == shard.name
    assert str(remote.value).split(": ", 1)[1] == str(local.value).split(": ", 1)[1]


# --- a pipeline stage -------------------------------------------------------------------------------------


class PassThrough(nn.Module):
    """A decoder layer another stage holds."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def _stage_shard(key: str) -> int:
    """Shard 1: embeddings and layer 0 (the first stage); 2: layer 1; 3: the final norm and the head."""
    if key.startswith(("model.embed_tokens.", "model.layers.0.")):
        return 0
    return 1 if key.startswith("model.layers.1.") else 2


def test_a_pipeline_stage_downloads_only_its_shards(
    fake_hub: FakeHub, checkpoint: Path, tmp_path: Path
) -> None:
    staged = reshard(checkpoint, tmp_path / "staged", _stage_shard, 3)
    fake_hub.add_directory("org/staged", staged)
    fake_hub.reset_counters()
    model = automodel_plugins.build_model("org/staged", registry=registry())
    model.model.layers[1] = PassThrough()
    model.model.norm, model.lm_head = nn.Identity(), None
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, "org/staged", stage=True, registry=registry())
    first, second, third = shard_names(staged)
    sizes = weights_bytes(staged)
    assert served(fake_hub, "org/staged") == {
        "config.json": sizes["config.json"],
        INDEX_NAME: sizes[INDEX_NAME],
        # The stage's own shard: its header (read to plan, before it was known to be needed), then whole.
        first: header_bytes(staged / first) + sizes[first],
        second: header_bytes(staged / second),  # the others: headers only, to plan the stage
        third: header_bytes(staged / third),
    }
    assert report.unused_keys_allowed > 0
    whole = reference_model(checkpoint, model_class=LlamaForCausalLM).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, whole[name]), name


# --- progress bars ----------------------------------------------------------------------------------------


def test_download_bars_follow_the_progress_switch(
    hub: FakeHub, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    automodel_plugins.from_pretrained(REPO, progress=False, cache_dir=tmp_path / "quiet", registry=registry())
    assert "safetensors" not in capfd.readouterr().err
    automodel_plugins.from_pretrained(REPO, progress=True, cache_dir=tmp_path / "loud", registry=registry())
    err = capfd.readouterr().err
    assert "model-00001-of-00003.safetensors" in err and "B/s" in err
    automodel_plugins.from_pretrained(REPO, cache_dir=tmp_path / "auto", registry=registry())
    assert "safetensors" not in capfd.readouterr().err  # automatic: off under pytest, as the loading bar
