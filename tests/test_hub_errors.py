"""What a repo id that cannot be had raises: a typed error naming the repo id and what to do, for an unknown
repo, an unknown revision, a gated or private repo without a (good) token, and offline with nothing cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_checkpoints import registry, write_llama

import automodel_plugins
from automodel_plugins import CheckpointError, ConfigError
from automodel_plugins.errors import (
    HubAccessError,
    HubDownloadError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    SourceNotFoundError,
)
from automodel_plugins.sources import HubLocation, is_repo_id, resolve
from automodel_plugins.testing.fake_hub import FakeHub

GOOD_TOKEN = "hf_good"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("errors") / "ckpt")


@pytest.fixture
def hub(fake_hub: FakeHub, checkpoint: Path) -> FakeHub:
    fake_hub.add_directory("org/public", checkpoint)
    fake_hub.add_directory("org/gated", checkpoint, gated=True, tokens={GOOD_TOKEN})
    fake_hub.add_directory("org/private", checkpoint, private=True, tokens={GOOD_TOKEN})
    fake_hub.reset_counters()
    return fake_hub


def test_an_unknown_repo(hub: FakeHub) -> None:
    with pytest.raises(HubRepoNotFoundError) as caught:
        automodel_plugins.from_pretrained("org/nothing-here", registry=registry())
    error = caught.value
    assert isinstance(error, SourceNotFoundError) and isinstance(error, ConfigError)
    assert error.repo_id == "org/nothing-here"
    assert (
        "'org/nothing-here'" in str(error) and "no such local path" in str(error) and "HF_TOKEN" in str(error)
    )


def test_an_unknown_revision(hub: FakeHub) -> None:
    with pytest.raises(HubRevisionNotFoundError) as caught:
        automodel_plugins.load_config("org/public", revision="v9")
    assert caught.value.revision == "v9" and "'org/public'@v9" in str(caught.value)
    assert "revision=" in str(caught.value)


def test_a_gated_repo_needs_a_token_with_access(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubAccessError, match=r"gated repo: no token was sent.*HF_TOKEN") as caught:
        automodel_plugins.from_pretrained("org/gated", registry=registry())
    assert isinstance(caught.value, CheckpointError) and caught.value.filename == "config.json"
    with pytest.raises(HubAccessError, match="the token sent has no access"):
        automodel_plugins.load_config("org/gated", token="hf_wrong")
    assert automodel_plugins.load_config("org/gated", token=GOOD_TOKEN).model_type == "llama"
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # read per request, as huggingface_hub does
    model = automodel_plugins.from_pretrained("org/gated", revision="main", registry=registry())
    assert model.automodel_composition.plugin == "claim_llama"


def test_a_private_repo_without_a_token_looks_like_no_repo(hub: FakeHub) -> None:
    with pytest.raises(HubRepoNotFoundError, match="if the repo is private"):
        automodel_plugins.describe_checkpoint("org/private", registry=registry())
    description = automodel_plugins.describe_checkpoint("org/private", token=GOOD_TOKEN, registry=registry())
    assert description["hub"]["repo_id"] == "org/private" and description["bytes_read"] == 0


def test_offline_nothing_cached_and_no_request(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for call in (automodel_plugins.from_pretrained, automodel_plugins.describe_checkpoint):
        with pytest.raises(HubOfflineError, match=r"HF_HUB_OFFLINE=1.*network access"):
            call("org/public", registry=registry())
    assert hub.requests == []


def test_a_repo_id_only_when_no_such_path(tmp_path: Path) -> None:
    """A missing path that cannot be a repo id stays a plain missing path; a file name is never a repo."""
    for text in (str(tmp_path / "gone"), "./org/name", "../name", "a/b/c", "org/model.safetensors", "a--b/c"):
        assert not is_repo_id(text), text
        with pytest.raises(SourceNotFoundError) as caught:
            resolve(text)
        assert not isinstance(caught.value, HubRepoNotFoundError)
    for text in ("org/name", "gpt2", "mistralai/Ministral-3-8B-Instruct-2512"):
        assert is_repo_id(text) and isinstance(resolve(text), HubLocation)


@pytest.mark.slow  # huggingface_hub retries the 500 with backoff: ~20 s
def test_a_hub_that_answers_with_an_error_is_not_called_unreachable(hub: FakeHub) -> None:
    """huggingface_hub reports a failed HEAD as "not in the local cache"; the hub's answer is the error."""
    hub.add_override(r"/org/public/resolve/[^/]+/config\.json$", 403)
    with pytest.raises(HubAccessError, match=r"HTTP 403") as caught:
        automodel_plugins.load_config("org/public")
    assert caught.value.filename == "config.json" and "cannot be reached" not in str(caught.value)
    hub.clear_overrides()
    hub.add_override(r"/org/public/resolve/[^/]+/config\.json$", 500, method="HEAD")
    with pytest.raises(HubDownloadError, match=r"HTTP 500") as caught:
        automodel_plugins.load_config("org/public")
    assert caught.value.filename == "config.json" and "cannot be reached" not in str(caught.value)


def test_an_unreachable_hub_is_offline(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, hf_api

    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", closed)
    with pytest.raises(HubOfflineError, match=r"cannot be reached .*Connection refused"):
        automodel_plugins.load_config("org/public")
