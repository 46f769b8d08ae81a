"""The hub options as one value: each entry point builds a ``HubOptions`` from transformers' keyword names and
the value reaches the hub request (a gated repo opens only with the token given), ``progress`` included where
docs/hub.md says every entry point takes it; the token never shows in the value's ``repr``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hub_checkpoints import registry, write_llama

import automodel_plugins
from automodel_plugins.errors import HubAccessError
from automodel_plugins.sources import HubLocation, HubOptions, resolve
from automodel_plugins.testing.fake_hub import FakeHub

TOKEN = "hf_only_this_one"
REPO = "org/gated-options"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("options") / "ckpt")


@pytest.fixture
def hub(fake_hub: FakeHub, checkpoint: Path) -> FakeHub:
    fake_hub.add_directory(REPO, checkpoint, gated=True, tokens={TOKEN})
    return fake_hub


def _open(path: str, **options: Any) -> Any:
    with automodel_plugins.Checkpoint.open(path, download=False, **options) as checkpoint:
        return checkpoint.keys()


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "load_config": lambda path, **options: automodel_plugins.load_config(path, **options),
    "Checkpoint.open": _open,
    "describe_checkpoint": lambda path, **options: automodel_plugins.describe_checkpoint(
        path, registry=registry(), **options
    ),
    "build_model": lambda path, **options: automodel_plugins.build_model(
        path, registry=registry(), **options
    ),
    "from_pretrained": lambda path, **options: automodel_plugins.from_pretrained(
        path, registry=registry(), **options
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_passes_its_options_to_the_hub(hub: FakeHub, entry: str) -> None:
    call = ENTRY_POINTS[entry]
    with pytest.raises(HubAccessError, match="no token was sent"):
        call(REPO, revision="main", local_files_only=False, progress=False)
    assert call(REPO, revision="main", token=TOKEN, local_files_only=False, progress=False) is not None


def test_resolve_hands_the_value_to_the_location_and_hides_the_token() -> None:
    options = HubOptions(revision="v2", token=TOKEN, progress=False)
    location = resolve("org/not-a-local-path", options)
    assert isinstance(location, HubLocation) and location.options is options
    assert TOKEN not in repr(options) and "revision='v2'" in repr(options)
    assert resolve("org/not-a-local-path").options == HubOptions()
